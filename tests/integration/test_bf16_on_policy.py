"""The SD3.5 config's own precision on CPU: bf16 sampling and bf16-mixed training of the tiny model, with the
config's LoRA (r=32), CFG 4.5, 10 steps and batch-invariant chunks of 4, through the real entry point.

Before any update the trainer must reproduce the rollout's log-probs: the first inner step's clip fraction at the
config's clip range (1e-4) is at most 1% and its ratio deviation is reported. Bit equality (deviation 0.0) is
asserted because batch-invariant mode fixes every call's shape on both sides. A second run samples in float32 and
trains in bf16 with the old log-probs recomputed by the actor: on-policy by construction, the gap logged.

The first run is also the recipe's LoRA path end to end: the adapter with KL to the adapter-disabled base and CFG,
synced to the replica and checkpointed alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import ONE_REPLICA
from recipe_runs import SD35_ON_CPU as SD35_CPU_BASE

from verl_omni.utils.checkpoint import find_latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# The CPU stand-in for the GPU recipe: only placement, size and batch shrink (one agent-loop worker, not
# the config's four, and one rollout replica: each is a process importing verl or diffusers).
SD35_ON_CPU = [
    *SD35_CPU_BASE,
    *ONE_REPLICA,
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "data.train_batch_size=2",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "ray_kwargs.ray_init.num_cpus=4",
    "trainer.test_freq=-1",
    "trainer.val_before_train=false",
    "trainer.save_freq=-1",
    "trainer.logger=[file]",
    "trainer.resume_mode=disable",
]


def _run(model_path: str, run_dir: Path, ray: dict[str, str], *overrides: str) -> tuple[list[dict], str]:
    """Train with the SD3.5 config on the tiny model, joining the session's Ray (``ray``: ``recipe_ray``); the
    training steps' metrics and the run's stderr."""
    env = {**os.environ, "MODEL_PATH": model_path, "PYTHONUNBUFFERED": "1", **ray}
    args = [
        *SD35_ON_CPU,
        f"trainer.default_local_dir={run_dir}",
        *overrides,
    ]
    proc = warm_recipe.run(args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line)["data"] for line in lines if line.strip()]
    return [r for r in rows if "reward/mean" in r], proc.stdout + proc.stderr


def test_bf16_rollout_and_bf16_training_agree_at_the_sd35_settings(tiny_model_path, tmp_path, recipe_ray):
    # 2 steps: the second samples with a trained (nonzero) adapter, which both sides must cast alike too
    run_dir = tmp_path / "bf16"
    rows, output = _run(tiny_model_path, run_dir, recipe_ray, "trainer.total_training_steps=2", "trainer.save_freq=2")
    assert len(rows) == 2
    for data in rows:
        assert data["actor/clip_frac_first"] <= 0.01
        assert data["actor/ratio_max_abs_dev"] == 0.0  # fixed chunk shapes on both sides: the same bits
        assert data["actor/log_ratio_abs_mean"] == 0.0
    # neither the start-up precision warning nor the off-policy first-step warning
    assert "recompute_old_log_prob" not in output and "the first inner step clipped" not in output
    assert rows[1]["rollout/model_version"] == 1.0  # the replica served step 2 with the updated adapter
    assert rows[1]["actor/kl"] > 0.0  # the adapter moved the policy away from the base
    step, path = find_latest_checkpoint(run_dir / "checkpoints")
    trainable = load_checkpoint(path, weights_only=False)["actor"]["trainable"]
    assert step == 2 and trainable and all("lora" in name for name in trainable)  # only the adapter is saved


def test_fp32_rollout_with_bf16_training_is_on_policy_when_the_actor_recomputes(tiny_model_path, tmp_path, recipe_ray):
    rows, output = _run(
        tiny_model_path,
        tmp_path / "recompute",
        recipe_ray,
        "trainer.total_training_steps=1",
        "actor_rollout_ref.rollout.diffusion.dtype=float32",
        "actor_rollout_ref.actor.recompute_old_log_prob=true",
        "actor_rollout_ref.actor.rollout_is_threshold=2.0",
    )
    (data,) = rows
    assert data["actor/ratio_max_abs_dev"] == 0.0 and data["actor/clip_frac_first"] == 0.0
    # the rollout's float32 log-probs are another function: the gap is measured, not hidden
    gap_max, gap_mean = data["actor/rollout_log_prob_gap_max"], data["actor/rollout_log_prob_gap_mean"]
    assert math.isfinite(gap_max) and gap_max >= gap_mean > 0.0
    assert data["actor/rollout_ratio_max_abs_dev"] > 0.0
    assert data["timing_s/old_log_prob"] > 0.0
    assert 0.0 < data["actor/is_weight_mean"] <= 2.0
    assert "warning: actor_rollout_ref" not in output  # recompute on: the precision combination is fine
