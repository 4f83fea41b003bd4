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


def test_a_reward_by_import_path_function_and_class(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_test.py").write_text(
        "import torch\n"
        "def brightness(images, prompts, scale=1.0):\n"
        "    return images.float().mean(dim=(1, 2, 3)) / 255 * scale\n"
        "class Constant:\n"
        "    def __init__(self, value=0.5):\n"
        "        self.value = value\n"
        "    def __call__(self, images, prompts):\n"
        "        return torch.full((len(prompts),), self.value)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = WeightedReward.from_config(
        {
            "name": None,
            "weights": {"my_rewards_for_test:brightness": 1.0, "my_rewards_for_test:Constant": 2.0},
            "kwargs": {
                "my_rewards_for_test:brightness": {"scale": 2.0},
                "my_rewards_for_test:Constant": {"value": 0.25},
            },
        }
    )
    total, terms = reward(_images(), ["a", "b"])
    torch.testing.assert_close(terms["my_rewards_for_test:brightness"], torch.full((2,), 2 * 200 / 255))
    torch.testing.assert_close(total, torch.full((2,), 2 * 200 / 255 + 0.5))
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['scal'\] .*valid options: \['scale'\]"):
        reward_specs({"name": "my_rewards_for_test:brightness", "kwargs": {"scal": 1}})
    with pytest.raises(ValueError, match=r"reward\.name='no_such_module_xyz:f': cannot import 'no_such_module_xyz'"):
        reward_specs({"name": "no_such_module_xyz:f"})
    with pytest.raises(ValueError, match=r"module 'my_rewards_for_test' has no callable 'nope'"):
        reward_specs({"name": "my_rewards_for_test:nope"})
