"""The geneval_color reward: parsing the colour word, the soft-assignment score, its range and monotonicity."""

from __future__ import annotations

import pytest
import torch

from verl_omni.models.palette import PALETTE
from verl_omni.rewards import get_reward_fn, registered_rewards
from verl_omni.rewards.color import parse_color, srgb_to_lab

NAMES = list(PALETTE)


def _solid(rgb: tuple[int, int, int], size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()


@pytest.fixture(scope="module")
def reward():
    return get_reward_fn("geneval_color")


def test_registered_beside_the_other_rewards():
    assert {"geneval_color", "jpeg_compressibility", "pickscore"} <= set(registered_rewards())


@pytest.mark.parametrize(
    "prompt, color",
    [("a red car", "red"), ("An ORANGE cup", "orange"), ("a photo of a black dog.", "black"), ("white", "white")],
)
def test_parse_color_finds_the_one_colour_word(prompt, color):
    assert parse_color(prompt) == color


@pytest.mark.parametrize("prompt", ["a car", "a reddish car", "a pink car", ""])
def test_prompt_without_a_known_colour_names_prompt_and_colours(reward, prompt):
    with pytest.raises(ValueError, match=r"names no known colour; known colours: \['red', 'orange'") as info:
        reward(_solid((0, 0, 0)).unsqueeze(0), [prompt])
    assert repr(prompt) in str(info.value)


def test_validate_prompts_checks_a_whole_prompt_list(reward):
    reward.validate_prompts(["a red car", "an orange cup"])
    with pytest.raises(ValueError, match=r"prompt 'a car' names no known colour"):
        reward.validate_prompts(["a red car", "a car"])


def test_prompt_with_two_colours_is_ambiguous(reward):
    with pytest.raises(ValueError, match=r"'a red car on a blue mat' names several colours \['red', 'blue'\]"):
        reward(_solid((0, 0, 0)).unsqueeze(0), ["a red car on a blue mat"])


def test_solid_palette_colours_score_about_one_when_named_and_about_zero_otherwise(reward):
    images = torch.stack([_solid(rgb) for rgb in PALETTE.values()])
    for name in NAMES:
        scores = reward(images, [f"a {name} car"] * len(NAMES))
        assert scores.dtype == torch.float32 and scores.shape == (len(NAMES),)
        for other, score in zip(NAMES, scores.tolist(), strict=True):
            if other == name:
                assert score > 0.96
            else:
                assert score < 0.05  # closest pair (blue, purple): 0.031


def test_monotone_in_the_share_of_pixels_of_the_named_colour(reward):
    red, blue = PALETTE["red"], PALETTE["blue"]
    images = []
    for k in range(9):  # k of 8 columns red, the rest blue
        image = _solid(blue)
        image[:, :, :k] = _solid(red)[:, :, :k]
        images.append(image)
    scores = reward(torch.stack(images), ["a red kite"] * 9)
    assert torch.all(scores.diff() > 0)
    assert scores[0] < 0.01 and scores[-1] > 0.99
    assert scores[4].item() == pytest.approx((scores[0] + scores[-1]).item() / 2, abs=1e-6)  # the mean over pixels


@pytest.mark.parametrize("name", NAMES)
def test_monotone_along_a_blend_from_every_other_colour(reward, name):
    t = torch.linspace(0, 1, 11).view(-1, 1, 1, 1)
    target = torch.tensor(PALETTE[name], dtype=torch.float32).view(1, 3, 1, 1)
    for other in NAMES:
        if other == name:
            continue
        start = torch.tensor(PALETTE[other], dtype=torch.float32).view(1, 3, 1, 1)
        images = ((1 - t) * start + t * target).round().to(torch.uint8).expand(-1, 3, 2, 2).contiguous()
        scores = reward(images, [f"a {name} cup"] * 11)
        assert torch.all(scores.diff() >= 0), (other, scores)


def test_scores_lie_in_unit_interval_and_empty_batch(reward):
    noise = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scores = reward(noise, [f"a {name} bus" for name in NAMES[:6]])
    assert scores.shape == (6,) and torch.all((scores >= 0) & (scores <= 1))
    assert reward(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), []).shape == (0,)


def test_temperature_option_and_bad_values():
    grey = torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)
    soft = get_reward_fn("geneval_color", temperature=40.0)(grey, ["a red car"])
    hard = get_reward_fn("geneval_color", temperature=2.0)(grey, ["a red car"])
    assert soft > hard  # a softer assignment gives an off-palette grey more credit for red
    for bad in (0, -1.0, "10", True):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            get_reward_fn("geneval_color", temperature=bad)


def test_rejects_float_images(reward):
    with pytest.raises(ValueError, match="uint8"):
        reward(torch.zeros(1, 3, 4, 4), ["a red car"])


def test_lab_of_reference_colours():
    lab = srgb_to_lab(torch.tensor([[255, 255, 255], [0, 0, 0], [255, 0, 0]]))
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.01)
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.01)
    assert lab[2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # sRGB red, D65
