"""The trainer's validation with a stand-in rollout: fixed rows and seeds, current policy, no training state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from verl.protocol import DataProto

from recipes.flowgrpo.data import PromptBatch, ValidationBatches, validation_seed
from verl_omni.trainer.flowgrpo.rollout_batch import ROW_SAMPLING_PARAMS
from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer, OffPolicyBatchError
from verl_omni.utils.seeding import row_seed
from verl_omni.workers.config.training import TrainingSections

PROMPTS = ["a red cube", "a blue ball", "a green cone"]


class FakeRollout:
    """Answers like the agent-loop manager: one image per row, reward a function of the row's seed."""

    def __init__(self) -> None:
        self.version = 0
        self.calls: list[DataProto] = []

    def generate_sequences(self, batch: DataProto) -> DataProto:
        self.calls.append(batch)
        meta, rows = batch.meta_info, batch.non_tensor_batch["row_index"]
        seeds = [row_seed(meta["seed"], meta["global_steps"], int(r)) for r in rows]
        return DataProto.from_dict(
            tensors={
                "image": torch.zeros(len(batch), 3, 4, 4, dtype=torch.uint8),
                "rewards": torch.tensor([s % 1000 / 100 for s in seeds]),
                "model_version": torch.full((len(batch),), self.version),
            },
            non_tensors=dict(batch.non_tensor_batch),
            meta_info=meta,
        )


class NoBatcher:
    def batch(self, step: int):  # validation must not read training data
        raise AssertionError("validation read a training batch")


def make_trainer(
    tmp_path: Path, n: int = 1, actor: dict | None = None, **trainer_keys
) -> tuple[FlowGRPOTrainer, FakeRollout]:
    config = OmegaConf.create(
        {
            "trainer": {"total_training_steps": 25, "seed": 42, "test_freq": 10, "val_before_train": True}
            | trainer_keys,
            "actor_rollout_ref": {"rollout": {"agent": {"num_workers": 2}}, "actor": actor or {}},
        }
    )
    rollout = FakeRollout()
    trainer = FlowGRPOTrainer(
        config,
        batcher=NoBatcher(),
        agent_loop_manager=rollout,
        actor_wg=None,
        replicas=[],
        run_dir=tmp_path,
        sections=TrainingSections(),
        validation=ValidationBatches(PROMPTS, n=n, seed=42),
    )
    return trainer, rollout


def test_validation_uses_fixed_seeds_and_the_validation_sampling(tmp_path):
    trainer, rollout = make_trainer(tmp_path)
    first = trainer._validate(0)
    trainer.version = rollout.version = 10  # ten updates later
    again = trainer._validate(10)
    # same rows and noise: with an unchanged reward function, the score is the same
    assert {k: v for k, v in first.items() if k != "val/timing_s"} == {
        k: v for k, v in again.items() if k != "val/timing_s"
    }
    for call in rollout.calls:
        assert call.meta_info == {"global_steps": 0, "seed": validation_seed(42), "validate": True}
        # no padding: the agent-loop manager splits rows over its workers at group boundaries, any count
        assert list(call.non_tensor_batch["prompt"]) == PROMPTS
    ids = [list(call.non_tensor_batch["request_id"])[:3] for call in rollout.calls]
    assert ids == [["val0-row0", "val0-row1", "val0-row2"], ["val10-row0", "val10-row1", "val10-row2"]]
    rewards = torch.tensor([row_seed(validation_seed(42), 0, r) % 1000 / 100 for r in range(3)])
    assert first["val/reward/mean"] == pytest.approx(float(rewards.mean()))
    assert first["val/reward/std"] == pytest.approx(float(rewards.std(unbiased=False)))
    assert [h["step"] for h in trainer.val_history] == [0, 10]
    assert (tmp_path / "samples" / "val_step_00000.png").is_file()
    assert (tmp_path / "samples" / "val_step_00010.png").is_file()


def test_validation_with_several_samples_reports_the_group_spread(tmp_path):
    trainer, rollout = make_trainer(tmp_path, n=2)
    metrics = trainer._validate(0)
    assert len(rollout.calls[0]) == 6  # 3 prompts x 2 samples: no padding needed
    assert metrics["val/reward/group_std_mean"] > 0.0


def test_validation_refuses_a_stale_policy(tmp_path):
    trainer, rollout = make_trainer(tmp_path)
    trainer.version = 3  # the replicas still serve version 0
    with pytest.raises(OffPolicyBatchError, match="validation after step 3"):
        trainer._validate(3)


@pytest.mark.parametrize(
    ("keys", "steps"),
    [
        ({}, [0, 10, 20, 25]),
        ({"val_before_train": False}, [10, 20, 25]),
        ({"test_freq": -1}, [0]),
        ({"test_freq": 0, "val_before_train": False}, []),
        ({"test_freq": 5, "total_training_steps": 12}, [0, 5, 10, 12]),
    ],
)
def test_validation_schedule_follows_verl(tmp_path, keys, steps):
    trainer, _ = make_trainer(tmp_path, **keys)
    assert [s for s in range(trainer.total_steps + 1) if trainer.validates_at(s)] == steps


@pytest.mark.parametrize(
    ("mode", "recentre", "asks"),
    [("one_step_off", True, True), ("one_step_off", False, False), ("sync", True, False)],
)
def test_training_requests_ask_for_their_noise_only_to_recentre_stale_samples(tmp_path, mode, recentre, asks):
    """``one_step_off`` re-centres its stale transitions with the sampler's noise (``actor.recentre_stale``): only then
    does a training request ask its replica to return it; validation never does."""
    trainer, _ = make_trainer(tmp_path, actor={"recentre_stale": recentre}, rollout_mode=mode)
    rows = PromptBatch(
        step=3, base_seed=7, prompts=PROMPTS, uids=["a", "b", "c"], row_index=[0, 1, 2], prompt_index=[0, 1, 2]
    )
    params = trainer._make_batch(rows).non_tensor_batch.get(ROW_SAMPLING_PARAMS)
    assert (params is not None and all(p == {"record_noise": True} for p in params)) == asks
    assert ROW_SAMPLING_PARAMS not in trainer._make_batch(rows, validate=True).non_tensor_batch
