"""The reward service's wire format, shared by the server (``verl_omni.rewards.serve``) and the client
(``reward.name=remote``): plain JSON with the pixels as base64 bytes, so nothing received is ever unpickled and a
scorer in any language can answer it.

    GET  /health   -> {"status": "ok", "reward": "<name>", "protocol": 1}
    POST /score    {"prompts": [str] * B,
                    "images": {"shape": [B, H, W, 3], "dtype": "uint8", "data": "<base64 of the C-order bytes>"}}
                   -> {"scores": [float] * B}          (one finite score per image, in order)
    errors         -> {"error": "<what went wrong>"} with 401 (token), 422 (input the reward cannot score),
                      500 (the scorer failed)

With a token, every request carries ``Authorization: Bearer <token>`` (``/health`` too, so a start-up check
catches a wrong token).
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np

PROTOCOL_VERSION = 1
HEALTH_PATH = "/health"
SCORE_PATH = "/score"
DEFAULT_TOKEN_ENV = "VERL_OMNI_REWARD_TOKEN"


class ProtocolError(ValueError):
    """A message that does not follow the protocol (names the field and what was expected)."""


def encode_images(images_bhwc: np.ndarray) -> dict[str, Any]:
    """The ``images`` field for a uint8 ``(B, H, W, 3)`` array."""
    if images_bhwc.dtype != np.uint8 or images_bhwc.ndim != 4 or images_bhwc.shape[-1] != 3:
        raise ProtocolError(f"images must be uint8 (B, H, W, 3), got {images_bhwc.dtype} {images_bhwc.shape}")
    data = base64.b64encode(np.ascontiguousarray(images_bhwc).tobytes()).decode("ascii")
    return {"shape": list(images_bhwc.shape), "dtype": "uint8", "data": data}


def decode_images(field: Any) -> np.ndarray:
    """The uint8 ``(B, H, W, 3)`` array an ``images`` field holds; :class:`ProtocolError` for anything else."""
    if not isinstance(field, dict):
        raise ProtocolError(f"images must be an object with shape, dtype and data, got {type(field).__name__}")
    shape, dtype, data = field.get("shape"), field.get("dtype"), field.get("data")
    if dtype != "uint8":
        raise ProtocolError(f"images.dtype must be 'uint8', got {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or shape[3] != 3
    ):
        raise ProtocolError(f"images.shape must be [B, H, W, 3] of non-negative integers, got {shape!r}")
    if not isinstance(data, str):
        raise ProtocolError("images.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError as err:
        raise ProtocolError(f"images.data is not valid base64: {err}") from None
    if len(raw) != math.prod(shape):
        raise ProtocolError(f"images.data holds {len(raw)} bytes, shape {shape} needs {math.prod(shape)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def check_prompts(prompts: Any, count: int) -> list[str]:
    """``prompts`` as a list of ``count`` strings; :class:`ProtocolError` otherwise."""
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ProtocolError("prompts must be a list of strings")
    if len(prompts) != count:
        raise ProtocolError(f"got {count} images but {len(prompts)} prompts; need one prompt per image")
    return prompts


def check_scores(body: Any, count: int) -> list[float]:
    """The ``scores`` of a response body: ``count`` finite numbers, or :class:`ProtocolError` saying what is wrong
    (a missing or wrong-length list, a NaN or infinite score and the index of the first)."""
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise ProtocolError(f"the response has no 'scores' list: {str(body)[:200]}")
    if len(scores) != count:
        raise ProtocolError(f"the response has {len(scores)} scores for {count} images")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise ProtocolError(f"score {i} is {score!r}, not a number")
        if not math.isfinite(score):
            raise ProtocolError(f"score {i} is {score!r}; scores must be finite")
    return [float(s) for s in scores]
