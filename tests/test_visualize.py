"""Sample grids and reward curves are real PNGs of the expected size; video grids are real animated images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from verl_omni.utils.visualize import save_image_grid, save_reward_curve, save_sample_grid, save_video_grid


def _images(count: int, height: int = 16, width: int = 24) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def test_grid_layout_and_pixels(tmp_path):
    images = _images(5)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", ncols=3, pad=2)
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == (3 * (24 + 2) + 2, 2 * (16 + 2) + 2)
        png = png.convert("RGB")
        # Image 4 sits in row 1, column 1; its pixels are copied exactly.
        tile = png.crop((2 + 26, 2 + 18, 2 + 26 + 24, 2 + 18 + 16))
        assert torch.equal(torch.from_numpy(np.array(tile)).permute(2, 0, 1), images[4])


def test_grid_with_captions_and_scale(tmp_path):
    images = _images(4)
    plain = save_image_grid(images, tmp_path / "plain.png", scale=3)
    captioned = save_image_grid(images, tmp_path / "cap.png", captions=["a red cube on a table"] * 4, scale=3)
    with Image.open(plain) as a, Image.open(captioned) as b:
        assert a.size == (2 * (72 + 2) + 2, 2 * (48 + 2) + 2)  # ncols defaults to ceil(sqrt(4)) = 2
        assert b.size[0] == a.size[0] and b.size[1] > a.size[1]
        # Caption text is drawn: the strip under the first image is not blank.
        strip = b.convert("L").crop((2, 2 + 48, 2 + 72, 2 + 48 + 10))
        assert strip.getextrema()[0] < 128


def test_grid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid(torch.zeros(2, 3, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        save_image_grid(_images(2), tmp_path / "x.png", captions=["a"])


def test_reward_curve_png(tmp_path):
    steps = list(range(1, 21))
    means = [-10 + 0.3 * s for s in steps]
    path = save_reward_curve(steps, means, [0.5] * 20, tmp_path / "curve.png", size=(500, 300))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (500, 300)
        colors = {c for _, c in png.convert("RGB").getcolors(maxcolors=1 << 16)}
        assert (31, 119, 180) in colors  # the mean line is drawn
    single = save_reward_curve([3], [1.0], None, tmp_path / "one.png")
    with Image.open(single) as png:
        assert png.size == (640, 400)


def test_reward_curve_draws_the_validation_reward(tmp_path):
    def colors(path):
        with Image.open(path) as png:
            return {c for _, c in png.convert("RGB").getcolors(maxcolors=1 << 16)}

    steps = list(range(1, 11))
    train = save_reward_curve(steps, [0.1 * s for s in steps], None, tmp_path / "train.png")
    both = save_reward_curve(
        steps, [0.1 * s for s in steps], None, tmp_path / "both.png", val_points=[(0, 5.0), (10, 2.0)]
    )
    assert (214, 39, 40) not in colors(train)
    assert (214, 39, 40) in colors(both)  # the val line (and its legend), on an axis that reaches step 0
    with pytest.raises(ValueError, match="finite"):
        save_reward_curve([1], [1.0], None, tmp_path / "c.png", val_points=[(0, float("inf"))])


def test_reward_curve_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="same non-zero length"):
        save_reward_curve([1, 2], [1.0], None, tmp_path / "c.png")
    with pytest.raises(ValueError, match="finite"):
        save_reward_curve([1], [float("nan")], None, tmp_path / "c.png")


def test_video_grid_is_an_animated_image_whose_frames_are_the_frame_grids(tmp_path):
    videos = torch.randint(0, 256, (3, 4, 3, 8, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = save_sample_grid(videos, tmp_path / "step_00001", ncols=2, pad=2, fps=5)
    assert path == tmp_path / "step_00001.webp"
    with Image.open(path) as webp:
        assert webp.format == "WEBP" and webp.is_animated and webp.n_frames == 4
        assert webp.size == (2 * (12 + 2) + 2, 2 * (8 + 2) + 2)
        for f in range(4):  # lossless: frame f is every video's frame f, laid out as the image grid
            webp.seek(f)
            got = np.asarray(webp.convert("RGB"))
            assert webp.info["duration"] == 200
            np.testing.assert_array_equal(got[2:10, 16:28], videos[1, f].permute(1, 2, 0).numpy())
    gif = save_video_grid(videos, tmp_path / "v.gif", captions=["a", "b", "c"], scale=2)
    with Image.open(gif) as anim:
        assert anim.format == "GIF" and anim.n_frames == 4
    assert save_sample_grid(videos[:, 0], tmp_path / "img").suffix == ".png"  # 4-D: an image grid
    with pytest.raises(ValueError, match=r"saved as \.webp or \.gif"):
        save_video_grid(videos, tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"\(B, F, 3, H, W\)"):
        save_video_grid(videos[:, 0], tmp_path / "v.webp")
