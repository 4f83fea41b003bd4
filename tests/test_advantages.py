"""Group-relative advantages against hand-computed values (FLOWGRPO.md)."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.trainer.flowgrpo.advantages import compute_group_advantages, group_reward_stats


def test_per_group_normalisation_matches_closed_form():
    # Interleaved groups "a" = [1, 3] and "b" = [2, 2, 8]: population std, eps added to the std.
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, 8.0])
    uids = ["a", "a", "b", "b", "b"]
    adv = compute_group_advantages(rewards, uids, eps=1e-4)
    std_b = math.sqrt(((2 - 4) ** 2 * 2 + (8 - 4) ** 2) / 3)
    expected = [-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (std_b + 1e-4), -2 / (std_b + 1e-4), 4 / (std_b + 1e-4)]
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_groups_are_found_by_uid_not_by_position():
    rewards = torch.tensor([1.0, 10.0, 3.0, 30.0])
    adv = compute_group_advantages(rewards, ["a", "b", "a", "b"], eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    # Each group's advantages sum to zero.
    assert adv[[0, 2]].sum().abs() < 1e-6 and adv[[1, 3]].sum().abs() < 1e-6


def test_global_std_divides_by_batch_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 30.0])
    uids = ["a", "a", "b", "b"]
    batch_std = rewards.std(correction=0).item()
    adv = compute_group_advantages(rewards, uids, global_std=True, eps=1e-4)
    expected = torch.tensor([-1.0, 1.0, -10.0, 10.0]) / (batch_std + 1e-4)
    torch.testing.assert_close(adv, expected)


def test_constant_group_gets_zero_advantage():
    adv = compute_group_advantages(torch.tensor([5.0, 5.0, 5.0, 0.0, 1.0]), ["a", "a", "a", "b", "b"])
    torch.testing.assert_close(adv[:3], torch.zeros(3))
    assert adv[3] < 0 < adv[4]


def test_clip_max_bounds_advantages():
    # One outlier in a group of 10: unclipped advantage is 3.0 (= sqrt(9)); clipped to 2.
    rewards = torch.tensor([0.0] * 9 + [1.0])
    uids = ["g"] * 10
    unclipped = compute_group_advantages(rewards, uids, eps=0.0)
    assert unclipped[-1].item() == pytest.approx(3.0, rel=1e-6)
    clipped = compute_group_advantages(rewards, uids, eps=0.0, clip_max=2.0)
    assert clipped[-1].item() == pytest.approx(2.0)
    torch.testing.assert_close(clipped[:-1], unclipped[:-1])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 rewards but 3 uids"):
        compute_group_advantages(torch.tensor([1.0, 2.0]), ["a", "a", "b"])
    with pytest.raises(ValueError, match="1-D"):
        compute_group_advantages(torch.zeros(2, 2), ["a", "a"])
    with pytest.raises(ValueError, match="NaN"):
        compute_group_advantages(torch.tensor([1.0, float("nan")]), ["a", "a"])
    with pytest.raises(ValueError, match="clip_max"):
        compute_group_advantages(torch.tensor([1.0, 2.0]), ["a", "a"], clip_max=0.0)


def test_group_reward_stats():
    stats = group_reward_stats(torch.tensor([1.0, 1.0, 0.0, 2.0, 4.0, 4.0]), ["a", "a", "b", "b", "c", "c"])
    assert stats["num_groups"] == 3
    assert stats["zero_std_group_frac"] == pytest.approx(2 / 3)
    assert stats["group_std_mean"] == pytest.approx(1 / 3)
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["min"] == 0.0 and stats["max"] == 4.0
    assert stats["group_size_min"] == stats["group_size_max"] == 2


def test_informative_rows_drop_groups_of_identical_rewards_exactly():
    from verl_omni.trainer.flowgrpo.advantages import informative_rows

    # 0.1 * 3 rounds: r - mean of a constant group is not exactly 0 in floating point, the test on rewards is
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 1.0, 5.0, 5.0])
    uids = ["a", "a", "a", "b", "b", "b", "c", "c"]
    assert informative_rows(rewards, uids).tolist() == [False] * 3 + [True] * 3 + [False] * 2
    assert informative_rows(torch.zeros(0), []).numel() == 0
