"""The FlowGRPO recipe on the tiny FLUX.1 (``FluxPipeline``, embedded guidance 3.5), through its real entry point
on CPU: a run joining the session's Ray cluster, prompt-affinity routing over two diffusers replicas, LoRA as the
real config trains. Full fine-tuning runs end to end on SD3 (test_flowgrpo_recipe.py); FLUX's full weights are
trained and synced to a server in tests/test_family_weight_sync.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, SMALL_RUN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_two_steps_on_tiny_flux_train_on_policy(tmp_path, tiny_model, recipe_ray):
    """LoRA rank 4 (the default targets to_q/to_k/to_v/to_out.0 exist in FLUX's blocks)."""
    model = tiny_model("flux")
    run_dir = tmp_path / "run"
    args = [
        f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.total_training_steps=2",
        "actor_rollout_ref.model.lora_rank=4",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=3.5",
        *SMALL_RUN,
        *NO_VALIDATION,
    ]
    env = {**os.environ, **recipe_ray}
    proc = warm_recipe.run(args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["data"] for r in rows if "actor/ratio_max_abs_dev" in r["data"]]
    assert len(steps) == 2
    for row in steps:
        # unchanged weights at the first inner step: the trainer's FLUX recompute equals the replicas' sampling
        assert row["actor/ratio_max_abs_dev"] == 0.0
        assert row["rollout_routing/colocation"] == 1.0
        assert row["rollout_routing/replicas_used"] == 2.0
        assert row["rollout_routing/prompt_cache_hit_rate"] > 0  # a group's copies share one encoding
        assert row["actor/grad_norm"] > 0
    # the second step sampled with the updated weights (synced to every replica) and still trains on policy
    assert steps[1]["rollout/model_version"] == 1.0
