"""JPEG (in)compressibility rewards from DDPO (Black et al. 2023): need no weights, so they are the CPU default."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from verl_omni.rewards.registry import register_reward, validate_reward_inputs

if TYPE_CHECKING:
    import torch

DEFAULT_JPEG_QUALITY = 95  # DDPO's setting


def jpeg_size_kb(image_chw: torch.Tensor, quality: int = DEFAULT_JPEG_QUALITY) -> float:
    """Size in kilobytes (1000 bytes, as in DDPO) of one uint8 ``(3, H, W)`` image encoded as JPEG."""
    import numpy as np  # here: checking the reward's options (the recipe's start-up check) needs no numpy or PIL
    from PIL import Image

    array = np.ascontiguousarray(image_chw.detach().cpu().permute(1, 2, 0).numpy())
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def _validate_quality(quality: int) -> int:
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"reward option quality must be an int in [1, 100] (JPEG quality), got {quality!r}")
    return quality


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward:
    """Reward = minus the JPEG size in kB: smaller files (smoother, simpler images) score higher."""

    sign: float = -1.0

    def __init__(self, quality: int = DEFAULT_JPEG_QUALITY) -> None:
        self.quality = _validate_quality(quality)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch  # here: checking the reward's options (the recipe's start-up check) needs no torch

        validate_reward_inputs(images, prompts)
        sizes = [jpeg_size_kb(image, self.quality) for image in images]
        return torch.tensor(sizes, dtype=torch.float32) * self.sign


@register_reward("jpeg_incompressibility")
class JpegIncompressibilityReward(JpegCompressibilityReward):
    """Reward = the JPEG size in kB: detailed, high-frequency images score higher."""

    sign: float = 1.0
