"""The FlowGRPO recipe on the tiny Wan text-to-video model (``model=wan_tiny``: a ``WanPipeline``, 5 frames at
32x32, true CFG, the ``video_color`` reward), through its real entry point on CPU: a subprocess with its own local
Ray, two diffusers replicas and prompt-affinity routing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from PIL import Image
from recipe_runs import NO_VALIDATION, SMALL_RUN

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_two_steps_on_tiny_wan_train_on_policy_on_videos(tmp_path, verl_omni_cache, recipe_ray):
    """LoRA (the default targets to_q/to_k/to_v/to_out.0 exist in Wan's attention blocks), as the real checkpoint's
    config trains. Full fine-tuning needs nothing of the family beyond what the unit tests check (the exact recompute
    and a full weight push to a server); the recipe runs it end to end on SD3 and FLUX: one recipe run per family
    here."""
    run_dir = tmp_path / "run"
    args = [
        "model=wan_tiny",
        "server_routing.policy=prompt_uid_affinity",  # the recipe's default, named: the group co-locates
        f"trainer.default_local_dir={run_dir}",
        "trainer.total_training_steps=2",
        "trainer.sample_freq=1",
        "actor_rollout_ref.model.lora_rank=4",
        *SMALL_RUN,
        *NO_VALIDATION,
    ]
    # the tiny Wan is built on first use (about 12 s, before Ray) into the session's cache, or found there
    env = {**os.environ, "VERL_OMNI_CACHE": str(verl_omni_cache), **recipe_ray}
    proc = warm_recipe.run(args, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["data"] for r in rows if "actor/ratio_max_abs_dev" in r["data"]]
    assert len(steps) == 2
    for row in steps:
        # unchanged weights at the first inner step: the trainer's Wan recompute (5-D latents, CFG) equals sampling
        assert row["actor/ratio_max_abs_dev"] == 0.0
        assert row["rollout_routing/colocation"] == 1.0 and row["rollout_routing/replicas_used"] == 2.0
        assert row["rollout_routing/prompt_cache_hit_rate"] > 0  # a group's copies share one encoding
        assert (row["rollout/video_frames"], row["rollout/video_height"], row["rollout/video_width"]) == (5, 32, 32)
        assert 0.0 <= row["reward/min"] <= row["reward/max"] <= 1.0
        assert row["actor/grad_norm"] > 0
    # the second step sampled with the updated weights (synced to both replicas) and still trains on policy
    assert steps[1]["rollout/model_version"] == 1.0
    with Image.open(run_dir / "samples" / "step_00001.webp") as grid:  # the sample grid is a 5-frame animation
        assert grid.is_animated and grid.n_frames == 5
