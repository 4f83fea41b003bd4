"""Group-relative advantages against hand-computed values (FLOWGRPO.md)."""

from __future__ import annotations

import math

import pytest
import torch

from verl_omni.trainer.flowgrpo.advantages import compute_group_advantages, group_reward_stats
from verl_omni.workers.config.algorithm import AlgorithmConfig


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


def test_zero_advantage_rows_are_dropped_per_sample_exactly():
    from verl_omni.trainer.flowgrpo.advantages import nonzero_advantage_rows

    # "a": 0.1 * 3 rounds (r - mean is 1e-17 in floating point, 0 in the math): every sample dropped.
    # "b": 1 is its group's mean (1, 2, 0): that sample alone is dropped, as the reference's per-sample mask does.
    # "c": constant group. "d": no reward at the mean.
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 0.0, 5.0, 5.0, 1.0, 4.0], dtype=torch.float64)
    uids = ["a", "a", "a", "b", "b", "b", "c", "c", "d", "d"]
    keep = nonzero_advantage_rows(rewards, uids)
    assert keep.tolist() == [False] * 3 + [False, True, True] + [False] * 2 + [True] * 2
    assert nonzero_advantage_rows(torch.zeros(0), []).numel() == 0
    # The same rows have advantage exactly 0 (not 1e-13), and only they do.
    adv = compute_group_advantages(rewards, uids, global_std=True)
    assert ((adv == 0) == ~keep).all()


class _Ranks:
    def __init__(self, world_size: int) -> None:
        self.world_size = world_size


def _rollout(n: int, steps: int = 3):
    from verl.protocol import DataProto

    from verl_omni.protocol import CONDITIONING, CONDITIONING_INDEX, NEGATIVE_CONDITIONING_INDEX

    # latents and sigmas hold steps + 1 values (before each step, then after the last); log_probs one per step
    chain = {k: torch.arange(n * (steps + 1), dtype=torch.float32).view(n, steps + 1) for k in ("latents", "sigmas")}
    tensors = {
        **chain,
        "log_probs": torch.arange(n * steps, dtype=torch.float32).view(n, steps),
        "advantages": torch.zeros(n),
        CONDITIONING_INDEX: torch.arange(n) // 3,  # a group of 3 copies shares its prompt's entry
        NEGATIVE_CONDITIONING_INDEX: torch.full((n,), -1),
    }
    table = [{"embeds": torch.full((2,), float(i))} for i in range((n + 2) // 3)]
    return DataProto.from_dict(tensors=tensors, meta_info={CONDITIONING: table})


@pytest.mark.parametrize(
    ("world_size", "expected_rows"), [(1, [1, 2, 3, 5]), (2, [1, 2, 3, 5]), (3, [0, 1, 2, 3, 4, 5])]
)
def test_training_batch_keeps_nonzero_advantages_and_tops_up_to_the_ranks(world_size: int, expected_rows) -> None:
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer

    trainer = FlowGRPOTrainer.__new__(FlowGRPOTrainer)  # only the fields _training_batch reads
    trainer.algorithm, trainer.trained_steps, trainer.actor_wg = AlgorithmConfig(), 2, _Ranks(world_size)
    # rows 0 (a's mean), 4 (b's mean) and 6-8 (a constant group) have advantage 0; with 3 ranks the first two
    # of them top the 4 kept rows up to 6
    rewards = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 5.0, 2.0, 2.0, 2.0])
    uids = ["a", "a", "a", "b", "b", "b", "c", "c", "c"]
    batch, kept_fraction = trainer._training_batch(_rollout(9), rewards, uids)
    assert kept_fraction == pytest.approx(4 / 9)  # the share with a nonzero advantage, before any top-up
    assert len(batch) % world_size == 0
    # the rows kept, read back from the per-step tensor (row i starts at i * (steps + 1)), cut to the trained steps
    assert (batch.batch["sigmas"][:, 0] / 4).long().tolist() == expected_rows
    assert batch.batch["sigmas"].shape[1] == 3 and batch.batch["log_probs"].shape[1] == 2
    # only the conditioning entries the kept rows use travel on, re-indexed
    table = batch.meta_info["conditioning"]
    kept_groups = sorted({r // 3 for r in expected_rows})
    assert [int(e["embeds"][0]) for e in table] == kept_groups
    for row, index in zip(expected_rows, batch.batch["conditioning_index"].tolist(), strict=True):
        assert int(table[index]["embeds"][0]) == row // 3


def test_training_batch_is_none_when_every_advantage_is_zero() -> None:
    from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer

    trainer = FlowGRPOTrainer.__new__(FlowGRPOTrainer)
    trainer.algorithm, trainer.trained_steps, trainer.actor_wg = AlgorithmConfig(), 3, _Ranks(2)
    assert trainer._training_batch(_rollout(4), torch.tensor([1.0, 1.0, 0.5, 0.5]), ["a", "a", "b", "b"]) == (
        None,
        0.0,
    )
