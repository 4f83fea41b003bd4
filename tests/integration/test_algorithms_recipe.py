"""Each algorithm of ``algorithm.name`` through the recipe's real entry point, 2 steps on CPU: the same trainer,
rollout and routing, on policy at the first inner step (batch-invariant: ``actor/ratio_max_abs_dev`` exactly 0;
DiffusionNFT: its old policy equals the trained one, ``actor/nft_old_dev_max_first`` exactly 0, until it lags),
training on the steps its windows say. One run per algorithm, on one rollout replica (a run is about 40 s, mostly
start-up)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import warm_recipe
from recipe_runs import NO_VALIDATION, ONE_REPLICA, SMALL_RUN

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_env(verl_omni_cache, recipe_ray) -> dict[str, str]:
    """A run's environment: the session's model cache and Ray cluster."""
    return {**os.environ, "VERL_OMNI_CACHE": str(verl_omni_cache), **recipe_ray}


def _run(run_dir: Path, env: dict[str, str], *overrides: str, ratios: bool = True) -> list[dict]:
    """2 steps of the small run with ``overrides``; the per-step metrics. ``ratios``: check the on-policy ratio (an
    algorithm without log-probs has none)."""
    args = [
        f"trainer.default_local_dir={run_dir}",
        *SMALL_RUN,
        *NO_VALIDATION,
        *ONE_REPLICA,
        "trainer.total_training_steps=2",
        "trainer.save_freq=-1",
        *overrides,
    ]
    proc = warm_recipe.run(args, env=env, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r.get("data", r) for r in rows if "reward/mean" in r.get("data", r)]
    assert len(rows) == 2
    for row in rows:
        assert not ratios or row["actor/ratio_max_abs_dev"] == 0.0  # on policy, bit for bit
        assert row["actor/grad_norm"] > 0
    return rows


def test_flow_grpo_fast_with_cps_trains_on_a_random_window_per_group(tmp_path, run_env):
    # 4 steps (trained: 3); Fast's default range is the first half, [0, 2): a 1-step window starts at 0 or 1.
    # With CPS at noise level 0.8, as the authors' Fast configs: the recompute goes through the same CPS step.
    overrides = (
        "algorithm.name=flow_grpo_fast",
        "algorithm.fast.window_size=1",
        "actor_rollout_ref.rollout.diffusion.sde_type=cps",
        "actor_rollout_ref.rollout.diffusion.noise_level=0.8",
    )
    rows = _run(tmp_path / "fast", run_env, *overrides)
    for row in rows:
        assert row["actor/trained_steps"] == 1.0 and row["rollout/sde_window_size"] == 1.0
        shares = {k: v for k, v in row.items() if k.startswith("rollout/sde_window_start/")}
        assert set(shares) <= {"rollout/sde_window_start/0", "rollout/sde_window_start/1"}
        assert sum(shares.values()) == pytest.approx(1.0)
        assert all(4 * v == round(4 * v) for v in shares.values())  # whole groups of 4 copies share a window


def test_mix_grpo_slides_one_window_over_the_schedule(tmp_path, run_env):
    # a non-default schedule through Hydra and the trainer: exp_decay stays ceil(1 x exp(-0.1 max(0, s - 0))) = 1
    # step at starts 0 and 1 of the range [0, 3) (4 steps, trained: 3): the 2-step window moves every step
    overrides = (
        "algorithm.name=mix_grpo",
        "algorithm.mix.window_size=2",
        "algorithm.mix.schedule=exp_decay",
        "algorithm.mix.shift_every=1",
        "algorithm.mix.decay_threshold=0",
    )
    rows = _run(tmp_path / "mix", run_env, *overrides)
    assert [r["rollout/sde_window_start_mean"] for r in rows] == [0.0, 1.0]
    assert all(r["rollout/sde_window_start_min"] == r["rollout/sde_window_start_max"] for r in rows)
    assert all(r["actor/trained_steps"] == 2.0 for r in rows)


def test_grpo_guard_normalises_the_ratio_per_step(tmp_path, run_env):
    rows = _run(tmp_path / "guard", run_env, "algorithm.name=grpo_guard")
    for row in rows:
        assert row["actor/trained_steps"] == 3.0  # every step but the last (timestep_fraction 0.99 of 4)
        for t in range(3):  # the plain ratio and the normalised one the loss clips, per trained step
            assert {f"actor/ratio_mean_step{t}", f"actor/guard_ratio_std_step{t}"} <= row.keys()


def test_diffusion_nft_trains_on_the_forward_process_of_its_old_policys_samples(tmp_path, run_env):
    rows = _run(tmp_path / "nft", run_env, "algorithm.name=diffusion_nft", ratios=False)
    for row in rows:
        assert row["actor/trained_steps"] == 3.0  # noise levels per sample: int(4 x 0.99) of the 4 of its schedule
        assert "actor/ratio_max_abs_dev" not in row and "rollout/sde_window_size" not in row
        assert row["advantages/kept_fraction"] == 1.0  # every sample trains (the authors keep r = 1/2 rows)
        assert row["actor/positive_loss"] > 0 and row["actor/negative_loss"] > 0
    # one optimizer step per update (8 rows, mini-batch 8), after all of its losses: the decay after k steps is
    # min(0.001 k, 0.5)
    assert [r["actor/nft_old_decay"] for r in rows] == pytest.approx([0.001, 0.002])
    # step 1: the old policy is a copy of the trained weights, so v_old = v_theta bit for bit before the update;
    # step 2: it moved only 99.9% of the way to them (decay 0.001), so the sampling policy lags a little
    assert rows[0]["actor/nft_old_dev_max_first"] == 0.0
    assert 0 < rows[1]["actor/nft_old_dev_max_first"] < 1e-2
