"""Checks every text-to-image rollout server applies to a ``generate`` call before it queues anything."""

from __future__ import annotations

from typing import Any


def check_text_to_image_args(
    request_id: str, image_data: Any, video_data: Any, extra: dict[str, Any], backend: str
) -> None:
    """Raise ``ValueError`` for arguments beyond verl's server signature and for image or video inputs."""
    if extra:
        shown = ", ".join(f"{k}={v!r}" for k, v in sorted(extra.items()))
        raise ValueError(f"generate() got unexpected argument(s) {shown} (request_id={request_id!r})")
    for name, value in (("image_data", image_data), ("video_data", video_data)):
        if value is not None and not (isinstance(value, list | tuple) and len(value) == 0):
            raise ValueError(f"{name}={type(value).__name__} is not supported: the {backend} backend is text-to-image")
