"""A programmatic text-to-video reward in [0, 1]: the colour reward on every frame, with a temporal-consistency term.

A video family's samples are uint8 videos ``(B, F, 3, H, W)`` (frames first). Scoring frames alone would reward a
video that flickers between the named colour and noise as much as a steady one; the consistency term rewards frames
that change little from one to the next, so GRPO gets a signal for both what a video shows and how steadily it
shows it. Needs no weights (``reward.name=video_color``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from verl_omni.rewards.color import DEFAULT_TEMPERATURE, GenEvalColorReward
from verl_omni.rewards.registry import register_reward

if TYPE_CHECKING:
    import torch

DEFAULT_CONSISTENCY_WEIGHT = 0.25


def validate_video_inputs(videos: torch.Tensor, prompts: list[str] | None = None) -> None:
    """Reject inputs a video reward would mis-score: it takes uint8 ``(B, F, 3, H, W)``, one prompt per video."""
    import torch  # here: checking the reward's options and prompts (the recipe's start-up check) needs no torch

    if not isinstance(videos, torch.Tensor) or videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] != 3:
        desc = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(
            f"a video reward takes uint8 videos of shape (B, F, 3, H, W) (a video family's samples), got {desc}"
        )
    if prompts is not None and len(prompts) != videos.shape[0]:
        raise ValueError(f"got {videos.shape[0]} videos but {len(prompts)} prompts; need one prompt per video")


def temporal_consistency(videos: torch.Tensor) -> torch.Tensor:
    """``1 - mean |frame[f + 1] - frame[f]| / 255`` over consecutive frames, channels and pixels: (B,) in [0, 1];
    1 for a still video (and for a single frame)."""
    import torch

    if videos.shape[1] < 2:
        return torch.ones(videos.shape[0], dtype=torch.float32)
    diff = (videos[:, 1:].to(torch.int16) - videos[:, :-1].to(torch.int16)).abs().to(torch.float64)
    return (1.0 - diff.mean(dim=(1, 2, 3, 4)) / 255.0).to(torch.float32)


@register_reward("video_color")
class VideoColorReward:
    """Reward = ``(1 - w) * mean over frames of geneval_color(frame) + w * temporal_consistency(video)``.

    ``geneval_color`` is :class:`~verl_omni.rewards.color.GenEvalColorReward` (the share of pixels in the colour the
    prompt names, softly assigned in CIELAB), ``w`` the ``consistency_weight``. A still video of the named colour
    scores about 1, a still video of another palette colour about ``w``, a video alternating black and white frames
    ``(1 - w)`` times its frames' mean colour score.

    Args:
        temperature: the colour reward's softness in CIELAB units.
        consistency_weight: ``w`` in [0, 1]; 0 scores the frames alone.
    """

    validate_prompts = staticmethod(GenEvalColorReward.validate_prompts)

    def __init__(
        self, temperature: float = DEFAULT_TEMPERATURE, consistency_weight: float = DEFAULT_CONSISTENCY_WEIGHT
    ) -> None:
        weight = consistency_weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"reward option consistency_weight must be a number in [0, 1], got {weight!r}")
        self.consistency_weight = float(weight)
        self.frame_reward = GenEvalColorReward(temperature=temperature)

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        validate_video_inputs(videos, prompts)
        batch, frames = videos.shape[:2]
        if batch == 0:
            return torch.zeros(0, dtype=torch.float32)
        per_frame = self.frame_reward(videos.flatten(0, 1), [p for p in prompts for _ in range(frames)])
        color = per_frame.view(batch, frames).mean(dim=1)
        w = self.consistency_weight
        return ((1.0 - w) * color + w * temporal_consistency(videos)).to(torch.float32)
