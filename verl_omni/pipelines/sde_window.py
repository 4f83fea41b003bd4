"""The SDE window of a schedule: which denoising steps are sampled as recorded SDE steps.

Torch-free (the config check and the request check use it before any model loads).
"""

from __future__ import annotations

from collections.abc import Sequence


def resolve_sde_window(num_inference_steps: int, sde_window: Sequence[int] | None) -> tuple[int, int]:
    """Validate an SDE window ``[start, end)`` of step indices; None means every step."""
    if sde_window is None:
        return 0, num_inference_steps
    if (
        not isinstance(sde_window, Sequence)
        or isinstance(sde_window, str)
        or len(sde_window) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in sde_window)
    ):
        raise ValueError(f"sde_window={sde_window!r} must be [start, end) step indices (two ints) or null")
    start, end = sde_window
    if not 0 <= start < end <= num_inference_steps:
        raise ValueError(
            f"sde_window={list(sde_window)!r} is outside the schedule: need 0 <= start < end <= "
            f"num_inference_steps={num_inference_steps}"
        )
    return start, end
