"""Visualisations: sample grids (Pillow; PNG for images, animated WebP or GIF for videos) and the reward curve
(matplotlib; training reward per step, optionally with the validation reward)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_LINE = "#1f77b4"  # matplotlib's first two default colours: train, then val
_VAL_LINE = "#d62728"
_GRID_GREY = "#e1e1e1"


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + 3


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; the last line is cut with an ellipsis when the text does not fit."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1] + "..."
    for i, line in enumerate(lines):
        while font.getlength(line) > width and len(line) > 1:
            line = line[:-4] + "..." if len(line) > 4 else line[:-1]
        lines[i] = line
    return lines


def save_image_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 2,
    scale: int = 1,
    caption_lines: int = 2,
) -> Path:
    """Save uint8 ``(B, 3, H, W)`` images as one PNG grid, optionally captioned under each image.

    ``ncols`` defaults to ``ceil(sqrt(B))``. ``scale`` enlarges each image by an integer factor (nearest
    neighbour) so tiny-model samples stay visible. The image is ``ncols * (W*scale + pad) + pad`` wide and
    ``nrows * (H*scale + caption_height + pad) + pad`` high, with ``caption_height`` 0 without captions.
    """
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor of shape (B, 3, H, W) with B >= 1, got {desc}")
    canvas = _grid(images, captions, ncols, pad, scale, caption_lines)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


_ANIMATED_FORMATS = {".webp": "WEBP", ".gif": "GIF"}


def save_video_grid(
    videos: torch.Tensor,
    path: str | os.PathLike,
    captions: Sequence[str] | None = None,
    ncols: int | None = None,
    pad: int = 2,
    scale: int = 1,
    caption_lines: int = 2,
    fps: float = 8.0,
) -> Path:
    """Save uint8 ``(B, F, 3, H, W)`` videos as one animated grid: frame ``f`` is the :func:`save_image_grid` layout
    of every video's frame ``f``, looping at ``fps``. The format follows the suffix: ``.webp`` (lossless) or
    ``.gif`` (256 colours)."""
    if not isinstance(videos, torch.Tensor) or videos.dtype != torch.uint8 or videos.ndim != 5 or videos.shape[2] != 3:
        desc = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be a uint8 tensor of shape (B, F, 3, H, W) with B, F >= 1, got {desc}")
    out = Path(path)
    fmt = _ANIMATED_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"path={str(path)!r}: an animated grid is saved as {' or '.join(_ANIMATED_FORMATS)}")
    if videos.shape[1] == 0 or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"need at least one frame and fps > 0, got {videos.shape[1]} frames at fps={fps!r}")
    frames = [_grid(videos[:, f], captions, ncols, pad, scale, caption_lines) for f in range(videos.shape[1])]
    out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"lossless": True} if fmt == "WEBP" else {}
    duration = round(1000 / fps)
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=duration, loop=0, **extra)
    return out


def save_sample_grid(samples: torch.Tensor, stem: str | os.PathLike, **options: object) -> Path:
    """A batch's samples as one grid at ``stem`` plus the suffix of its kind: images (4-D) as ``.png``, videos (5-D:
    a video family's ``(B, F, 3, H, W)``) as an animated ``.webp``. ``options`` as :func:`save_image_grid`'s."""
    if isinstance(samples, torch.Tensor) and samples.ndim == 5:
        return save_video_grid(samples, Path(f"{stem}.webp"), **options)
    return save_image_grid(samples, Path(f"{stem}.png"), **options)


def _grid(
    images: torch.Tensor,
    captions: Sequence[str] | None,
    ncols: int | None,
    pad: int,
    scale: int,
    caption_lines: int,
) -> Image.Image:
    """The captioned grid of uint8 ``(B, 3, H, W)`` images (see :func:`save_image_grid`)."""
    count, _, height, width = images.shape
    if count == 0:
        raise ValueError("images must hold at least one image")
    if captions is not None and len(captions) != count:
        raise ValueError(f"got {count} images but {len(captions)} captions")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    ncols = min(ncols or math.ceil(math.sqrt(count)), count)
    nrows = math.ceil(count / ncols)
    cell_w, cell_h = width * scale, height * scale
    font = _font()
    line_h = _line_height(font)
    caption_h = caption_lines * line_h + 2 if captions is not None else 0

    canvas = Image.new("RGB", (ncols * (cell_w + pad) + pad, nrows * (cell_h + caption_h + pad) + pad), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = images.detach().cpu().permute(0, 2, 3, 1).contiguous().numpy()
    for i in range(count):
        row, col = divmod(i, ncols)
        x = pad + col * (cell_w + pad)
        y = pad + row * (cell_h + caption_h + pad)
        tile = Image.fromarray(pixels[i])
        if scale > 1:
            tile = tile.resize((cell_w, cell_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))
        if captions is not None:
            for j, line in enumerate(_wrap(str(captions[i]), font, cell_w, caption_lines)):
                draw.text((x, y + cell_h + 1 + j * line_h), line, fill=_TEXT, font=font)
    return canvas


def save_reward_curve(
    steps: Sequence[float],
    rewards_mean: Sequence[float],
    rewards_std: Sequence[float] | None,
    path: str | os.PathLike,
    size: tuple[int, int] = (640, 400),
    title: str = "reward mean per step",
    val_points: Sequence[tuple[float, float]] = (),
) -> Path:
    """Plot the mean reward per step, with a +-std band when ``rewards_std`` is given, as a ``size`` PNG
    (matplotlib, off-screen: no display, no pyplot state shared between threads).

    ``val_points`` (step, validation reward mean) are drawn as a second, red line with a legend, on the same
    axes: the validation reward is the same reward on fixed prompts and seeds, so the two curves compare.
    """
    steps = [float(s) for s in steps]
    means = [float(r) for r in rewards_mean]
    stds = None if rewards_std is None else [float(s) for s in rewards_std]
    val_steps = [float(x) for x, _ in val_points]
    val_means = [float(y) for _, y in val_points]
    if not steps or len(means) != len(steps) or (stds is not None and len(stds) != len(steps)):
        lengths = (len(steps), len(means), None if stds is None else len(stds))
        raise ValueError(f"steps, rewards_mean and rewards_std need the same non-zero length, got {lengths}")
    values = means + ([] if stds is None else stds) + val_means
    if not all(math.isfinite(v) for v in steps + values + val_steps):
        raise ValueError("steps and rewards must be finite numbers")
    width, height = size
    if width < 200 or height < 150:
        raise ValueError(f"size must be at least (200, 150), got {size}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if stds is not None:
        lows = [m - s for m, s in zip(means, stds, strict=True)]
        highs = [m + s for m, s in zip(means, stds, strict=True)]
        axes.fill_between(steps, lows, highs, color=_LINE, alpha=0.25, linewidth=0)
    axes.plot(steps, means, color=_LINE, marker="o", markersize=3, linewidth=2, label="train")
    if val_points:
        axes.plot(val_steps, val_means, color=_VAL_LINE, marker="o", markersize=3, linewidth=2, label="val")
        axes.legend(loc="upper right", fontsize="small")
    axes.set(title=title, xlabel="step")
    axes.grid(True, color=_GRID_GREY, linewidth=0.8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=dpi)
    return out
