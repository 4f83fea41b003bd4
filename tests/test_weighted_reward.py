"""The ``reward`` section: one reward or a weighted sum; failures name the reward and the prompt."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.rewards import get_reward_fn, register_reward
from verl_omni.rewards.weighted import RewardError, RewardSpec, WeightedReward, reward_specs


@register_reward("test_constant_by_prompt")
class _ByPrompt:
    """Scores 1.0, or NaN / inf / an exception for prompts that ask for it (to test the guards)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        if any("raise" in p for p in prompts):
            raise RuntimeError("scorer crashed")
        values = {"nan": math.nan, "inf": math.inf}
        return torch.tensor([values.get(p, self.scale) for p in prompts])


def _images(n: int = 2) -> torch.Tensor:
    return torch.full((n, 3, 16, 16), 200, dtype=torch.uint8)


def test_one_reward_by_name_has_weight_one():
    assert reward_specs({"name": "jpeg_compressibility", "kwargs": {"quality": 90}}) == [
        RewardSpec("jpeg_compressibility", 1.0, {"quality": 90})
    ]


def test_weighted_sum_and_each_term():
    reward = WeightedReward.from_config(
        {
            "name": None,
            "weights": {"jpeg_compressibility": 0.5, "test_constant_by_prompt": -2.0},
            "kwargs": {"test_constant_by_prompt": {"scale": 3.0}},
        }
    )
    images = _images()
    total, terms = reward(images, ["a", "b"])
    jpeg = get_reward_fn("jpeg_compressibility")(images, ["a", "b"])
    torch.testing.assert_close(terms["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(terms["test_constant_by_prompt"], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(total, 0.5 * jpeg - 2.0 * 3.0)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("nan", r"reward 'test_constant_by_prompt' returned nan for prompt 'nan'"),
        ("inf", r"reward 'test_constant_by_prompt' returned inf for prompt 'inf'"),
        ("please raise", r"reward 'test_constant_by_prompt' failed on prompt 'please raise': scorer crashed"),
    ],
)
def test_a_failed_score_stops_with_the_reward_and_prompt_never_zero(prompt, message):
    reward = WeightedReward.from_config({"name": "test_constant_by_prompt"})
    with pytest.raises(RewardError, match=message):
        reward(_images(1), [prompt])
