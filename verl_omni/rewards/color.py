"""A miniature of GenEval's colour task: a prompt-dependent reward in [0, 1] with a programmatic verifier.

GenEval (Ghosh et al. 2023), FlowGRPO's headline benchmark, asks for "a photo of a <colour> <object>" and checks the
object's colour with a detector. Here no weights are needed: the prompt names one colour of a fixed palette and the
reward measures how much of the image has that colour, so a policy scores well only if it follows the colour word of
its text conditioning. It is the CPU demo's reward (``reward.name=geneval_color``).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from verl_omni.models.palette import PALETTE
from verl_omni.rewards.registry import register_reward, validate_reward_inputs

if TYPE_CHECKING:
    import torch

DEFAULT_TEMPERATURE = 10.0  # CIELAB units: a palette colour keeps >= 0.97 of its own soft assignment

_WORD = re.compile(r"[a-z]+")


@functools.cache
def _srgb_to_xyz_and_d65_white() -> tuple[torch.Tensor, torch.Tensor]:
    """The linear-sRGB -> XYZ matrix and the D65 white point (float64), built on first use."""
    import torch  # here: checking the reward's options and prompts (the recipe's start-up check) needs no torch

    srgb_to_xyz = torch.tensor(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]],
        dtype=torch.float64,
    )
    return srgb_to_xyz, torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def srgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """CIELAB (D65) of sRGB colours given in [0, 255] on the last dimension; float64, same leading shape.

    Euclidean distance in Lab is roughly perceptual, so "how close to red" means what it looks like.
    """
    import torch

    srgb_to_xyz, d65_white = _srgb_to_xyz_and_d65_white()
    c = rgb.to(torch.float64) / 255.0
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ srgb_to_xyz.T / d65_white
    delta = 6.0 / 29.0
    f = torch.where(xyz > delta**3, xyz.clamp(min=delta**3) ** (1.0 / 3.0), xyz / (3 * delta**2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def parse_color(prompt: str, palette: tuple[str, ...] = tuple(PALETTE)) -> str:
    """The one palette colour named in ``prompt`` (whole word, any case).

    Raises ``ValueError`` naming the prompt and the known colours when it names none, or several different ones
    (the reward would not know which to score).
    """
    found = sorted({word for word in _WORD.findall(prompt.lower()) if word in palette}, key=palette.index)
    if len(found) != 1:
        what = "names no known colour" if not found else f"names several colours {found}"
        raise ValueError(f"reward 'geneval_color': prompt {prompt!r} {what}; known colours: {list(palette)}")
    return found[0]


def _validate_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < 1e6:
        raise ValueError(f"reward option temperature must be a positive number (CIELAB units), got {temperature!r}")
    return float(temperature)


@register_reward("geneval_color")
class GenEvalColorReward:
    """Reward = the mean over pixels of the soft assignment of each pixel to the colour named in the prompt.

    For a pixel with CIELAB colour ``x``, palette colours ``c_1..c_K`` and the named colour ``c_n``::

        p_n(x) = exp(-|x - c_n| / T) / sum_k exp(-|x - c_k| / T)        reward = mean over pixels of p_n(x)

    ``|.|`` is the Euclidean (CIE76) distance and ``T`` the ``temperature``. A solid image of the named colour scores
    about 1 (>= 0.97 at T = 10), of another palette colour about 0; the score rises smoothly as pixels move towards
    the named colour (over about T Lab units), which gives GRPO a signal before any pixel is exactly right. A random
    image scores about 1/K (K = 8).

    Args:
        temperature: softness of the assignment in CIELAB units (smaller: closer to a hard nearest-colour vote).
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE) -> None:
        import torch

        self.temperature = _validate_temperature(temperature)
        self.names = tuple(PALETTE)
        self.palette_lab = srgb_to_lab(torch.tensor(list(PALETTE.values()), dtype=torch.float64))

    @staticmethod
    def validate_prompts(prompts: list[str]) -> None:
        """Raise the ``ValueError`` of :func:`parse_color` for the first prompt the reward cannot score, so a run can
        refuse a prompt file at start-up instead of at its first reward (the recipe calls it before Ray starts)."""
        for prompt in prompts:
            parse_color(prompt, tuple(PALETTE))

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        import torch

        validate_reward_inputs(images, prompts)
        targets = torch.tensor([self.names.index(parse_color(p, self.names)) for p in prompts], dtype=torch.long)
        if images.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32)
        lab = srgb_to_lab(images.permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3))  # (B, HW, 3)
        distances = torch.cdist(lab, self.palette_lab.unsqueeze(0).expand(images.shape[0], -1, -1))  # (B, HW, K)
        assignment = torch.softmax(-distances / self.temperature, dim=-1)
        named = assignment.gather(-1, targets.view(-1, 1, 1).expand(-1, assignment.shape[1], 1)).squeeze(-1)
        return named.mean(dim=1).to(torch.float32)
