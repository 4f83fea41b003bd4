"""``trainer.rollout_mode=one_step_off`` through the recipe's real entry point, on CPU: the rollout for step k+1
samples with the weights of step k while step k trains, and each step after the first trains on samples one
version behind, re-centred on the current means. Trained as drawn (``recentre_stale=false``) the actor runs sync's
code on stale rows: tests/test_flowgrpo_validation.py checks its requests, benchmarks/rollout_mode_bench.py runs it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, ONE_REPLICA, SMALL_RUN

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_one_step_off_trains_each_step_on_the_previous_versions_samples_re_centred(
    tmp_path, verl_omni_cache, recipe_ray
):
    run_dir = tmp_path / "run"
    args = [
        f"trainer.default_local_dir={run_dir}",
        *SMALL_RUN,
        *NO_VALIDATION,
        *ONE_REPLICA,
        "trainer.total_training_steps=3",
        "trainer.save_freq=-1",
        "trainer.rollout_mode=one_step_off",  # re-centring stale transitions is its default
    ]
    env = {**os.environ, "VERL_OMNI_CACHE": str(verl_omni_cache), **recipe_ray}
    proc = warm_recipe.run(args, env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r.get("data", r) for r in rows if "reward/mean" in r.get("data", r)]
    assert len(rows) == 3
    # step 1 samples on-policy (nothing to overlap with); steps 2 and 3 train on samples drawn while the step
    # before them trained, with the weights it started from
    assert [r["rollout/model_version"] for r in rows] == [0.0, 0.0, 1.0]
    assert [r["rollout/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["actor/ratio_max_abs_dev"] == 0.0  # on-policy and batch-invariant: exact
    assert all("timing_s/rollout_wait" in r for r in rows[:2]) and "timing_s/rollout_wait" not in rows[2]
    # re-centred: each stale transition is moved onto the current means with its own noise, so the ratio stays 1 up
    # to float rounding while the means have moved (by how much, in noise stds, is logged)
    assert all(r["actor/ratio_max_abs_dev"] < 1e-4 for r in rows[1:])
    assert rows[0]["actor/recentre_shift_max"] < 1e-4  # on-policy: only rounding
    assert all(r["actor/recentre_shift_max"] > 1e-3 and r["actor/recentre_shift_rms"] > 0.0 for r in rows[1:])
