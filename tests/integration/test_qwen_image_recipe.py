"""The FlowGRPO recipe on the tiny Qwen-Image (``model=qwen_image_tiny``: true CFG 4 with a negative prompt, prompts
padded to one length), through its real entry point on CPU: a subprocess joining the session's Ray cluster, two
diffusers replicas and prompt-affinity routing; the tiny model comes from the session's cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, SMALL_RUN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_two_steps_on_tiny_qwen_image_train_on_policy(tmp_path, tiny_model, recipe_ray):
    """LoRA (the default targets to_q/to_k/to_v/to_out.0 exist in Qwen-Image's blocks), as the real checkpoint's config
    trains. Full fine-tuning needs nothing of the family beyond what the unit tests check (the exact recompute and a
    full weight push to a server); the recipe runs it end to end on SD3 and FLUX: one recipe run per family here."""
    run_dir = tmp_path / "run"
    args = [
        "model=qwen_image_tiny",
        f"trainer.default_local_dir={run_dir}",
        "trainer.total_training_steps=2",
        "actor_rollout_ref.model.lora_rank=4",
        *SMALL_RUN,
        *NO_VALIDATION,
    ]
    model = tiny_model("qwen_image")  # where the recipe looks for it (the session's VERL_OMNI_CACHE)
    env = {**os.environ, "VERL_OMNI_CACHE": str(Path(model).parents[1]), **recipe_ray}
    proc = warm_recipe.run(args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    config = (run_dir / "config.yaml").read_text()
    assert f"path: {model}" in config  # model=qwen_image_tiny names the tiny model in the cache
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["data"] for r in rows if "actor/ratio_max_abs_dev" in r["data"]]
    assert len(steps) == 2
    for row in steps:
        # unchanged weights at the first inner step: the trainer's Qwen-Image recompute (true CFG, masked padded
        # prompts) equals the replicas' sampling bit for bit
        assert row["actor/ratio_max_abs_dev"] == 0.0
        assert row["rollout_routing/colocation"] == 1.0 and row["rollout_routing/replicas_used"] == 2.0
        assert row["rollout_routing/prompt_cache_hit_rate"] > 0  # a group's copies share one encoding
        assert row["actor/grad_norm"] > 0
    # the second step sampled with the updated weights (synced to both replicas) and still trains on policy
    assert steps[1]["rollout/model_version"] == 1.0
