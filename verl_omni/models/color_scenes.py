"""Generated images of coloured shapes with captions: the data of the tiny model's local pretraining.

A scene is one colour of :data:`~verl_omni.models.palette.PALETTE` (the colours :mod:`verl_omni.rewards.color`
scores): a solid background with one flat shape in a lighter or darker shade of it, so the colour covers the image
(the colour reward counts pixels). Each object word of the colour prompts is drawn as a fixed shape, so the caption's
object means something (the demo's short pretraining learns little of it: a shade over a few 8x8 latent cells);
whether the caption's colour word agrees with the scene's colour is a knob (``color_agreement``), so pretraining can
leave colour adherence for RL to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_omni.models.palette import PALETTE

COLORS: tuple[str, ...] = tuple(PALETTE)
# The object words of recipes/flowgrpo/data/prompts.txt and val_prompts.txt, two per shape.
OBJECT_SHAPES: dict[str, str] = {
    "car": "square",
    "bus": "square",
    "dog": "circle",
    "cat": "circle",
    "bird": "triangle",
    "kite": "triangle",
    "cup": "ring",
    "clock": "ring",
    "chair": "cross",
    "bench": "cross",
    "umbrella": "diamond",
    "boat": "diamond",
}
OBJECTS: tuple[str, ...] = tuple(OBJECT_SHAPES)


def caption(color: str, obj: str) -> str:
    """``"a red car"`` / ``"an orange cup"``: the colour prompts' format (GenEval's, without "a photo of")."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {obj}"


@dataclass(frozen=True)
class SceneBatch:
    """Images in [-1, 1] ``(B, 3, H, W)`` float32, their captions and the index of each shape's colour."""

    images: torch.Tensor
    captions: list[str]
    colors: torch.Tensor  # (B,) index into COLORS of the scene's colour


def shade(rgb: torch.Tensor, amount: float = 0.4) -> torch.Tensor:
    """A darker shade of light colours and a lighter one of dark colours (0..255 RGB on dim -3)."""
    light = rgb.mean(dim=-3, keepdim=True) > 127.5
    return torch.where(light, rgb * (1 - amount), rgb + (255 - rgb) * amount)


def _shape_masks(shape: list[str], x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, H, W)`` masks; ``x``, ``y`` are offsets from each shape's centre in [-1, 1] units."""
    r = radius.view(-1, 1, 1)
    ax, ay = x.abs(), y.abs()
    dist = (x**2 + y**2).sqrt()
    masks = {
        "square": torch.maximum(ax, ay) <= 0.8 * r,
        "circle": dist <= r,
        "triangle": (y >= -r) & (y <= 0.8 * r) & (ax <= 0.6 * (y + r)),  # apex up (image y grows downwards)
        "ring": (dist <= r) & (dist >= 0.55 * r),
        "cross": ((ax <= 0.35 * r) & (ay <= r)) | ((ay <= 0.35 * r) & (ax <= r)),
        "diamond": ax + ay <= 1.2 * r,
    }
    return torch.stack([masks[s][i] for i, s in enumerate(shape)])


def random_scenes(
    n: int, size: int, generator: torch.Generator, color_agreement: float = 1.0, palette_rgb: torch.Tensor | None = None
) -> SceneBatch:
    """``n`` random scenes of ``size`` x ``size`` pixels, drawn from ``generator`` only (deterministic).

    The caption names the shape's object and, with probability ``color_agreement``, its colour; otherwise a colour
    drawn uniformly from the palette (which may coincide). ``color_agreement=0`` makes the colour word carry no
    information about the image.
    """
    palette = palette_rgb if palette_rgb is not None else torch.tensor(list(PALETTE.values()), dtype=torch.float32)
    k = len(COLORS)
    color = torch.randint(0, k, (n,), generator=generator)
    objects = torch.randint(0, len(OBJECTS), (n,), generator=generator)
    radius = 0.3 + 0.3 * torch.rand(n, generator=generator)
    centre = (torch.rand(n, 2, generator=generator) * 2 - 1) * (0.9 - radius).unsqueeze(1)
    agree = torch.rand(n, generator=generator) < color_agreement
    named = torch.where(agree, color, torch.randint(0, k, (n,), generator=generator))

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y = coords.view(1, -1, 1) - centre[:, 1].view(-1, 1, 1)
    x = coords.view(1, 1, -1) - centre[:, 0].view(-1, 1, 1)
    shapes = [OBJECT_SHAPES[OBJECTS[i]] for i in objects.tolist()]
    mask = _shape_masks(shapes, x, y, radius).unsqueeze(1)  # (B, 1, H, W)
    background = palette[color].view(n, 3, 1, 1)
    rgb = torch.where(mask, shade(background), background)
    captions = [caption(COLORS[c], OBJECTS[o]) for c, o in zip(named.tolist(), objects.tolist(), strict=True)]
    return SceneBatch(images=rgb / 127.5 - 1.0, captions=captions, colors=color)
