"""The FlowGRPO recipe on the tiny FLUX.1 (``FluxPipeline``, embedded guidance 3.5), through its real entry point
on CPU: a subprocess joining the session's Ray cluster, prompt-affinity routing over two diffusers replicas (LoRA;
full fine-tuning on one, which the routing adds nothing to)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, ONE_REPLICA, SMALL_RUN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_two_steps_on_tiny_flux_train_on_policy(tmp_path, lora_rank, tiny_model, recipe_ray):
    """Full fine-tuning and LoRA (the default targets to_q/to_k/to_v/to_out.0 exist in FLUX's blocks)."""
    model = tiny_model("flux")
    run_dir = tmp_path / "run"
    args = [
        f"actor_rollout_ref.model.path={model}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.total_training_steps=2",
        f"actor_rollout_ref.model.lora_rank={lora_rank}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=3.5",
        *SMALL_RUN,
        *NO_VALIDATION,
        *([] if lora_rank else ONE_REPLICA),
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
        assert row["rollout_routing/replicas_used"] == (2.0 if lora_rank else 1.0)
        assert row["rollout_routing/prompt_cache_hit_rate"] > 0  # a group's copies share one encoding
        assert row["actor/grad_norm"] > 0
    # the second step sampled with the updated weights (synced to every replica) and still trains on policy
    assert steps[1]["rollout/model_version"] == 1.0
