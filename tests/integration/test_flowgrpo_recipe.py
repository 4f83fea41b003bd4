"""The FlowGRPO recipe through its real entry point (`python -m recipes.flowgrpo.main`), on CPU.

Each run is a process of its own, joining the session's Ray cluster (``recipe_ray``) as a user joins a running
cluster: forked from a server that has imported the driver's modules (tests/warm_recipe.py), except
``two_step_run``, a fresh interpreter exactly as a user types the command.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import warm_recipe
from process_tree import actor_pids
from recipe_runs import NO_VALIDATION, ONE_REPLICA, SMALL_RUN, TWO_AGENT_WORKERS

from verl_omni.utils.checkpoint import find_latest_checkpoint, load_checkpoint

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Small and fast: 2 prompts x 4 samples, 4 denoising steps at 32x32, no tensorboard.
FAST = [*SMALL_RUN, "trainer.sample_freq=1"]
# Metrics of the policy update and its rollout: a pure function of the seed on CPU (timings and replica batch
# sizes are not; nor are the counts of replicas lost and replaced, which plain_run's kills change).
TRAINING_PREFIXES = ("reward/", "actor/", "advantages/", "rollout/")
REPLICA_FAULT_METRICS = ("rollout/replicas_live", "rollout/replicas_lost", "rollout/replicas_replaced")
# plain_run: its steps, and the two (drawn from a seed) during which a rollout replica is SIGKILLed; the last step
# always follows the replacements, so the run ends on every replica slot serving.
PLAIN_STEPS = 5
KILL_STEPS = sorted(random.Random(29).sample(range(1, PLAIN_STEPS - 1), 2))


def _main(
    run_dir: Path, env: dict[str, str], *overrides: str, timeout: int = 420, cold: bool = False
) -> subprocess.CompletedProcess:
    """A run to its end. ``cold``: a fresh interpreter (``python -m``) instead of a warm fork (tests/warm_recipe.py)."""
    args = [f"trainer.default_local_dir={run_dir}", *FAST, *overrides]
    proc = warm_recipe.run(args, env=env, timeout=timeout, cold=cold)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cache(verl_omni_cache) -> Path:
    """The session's cache: the tiny model the recipe builds on first use (model.path=null) is already there."""
    return verl_omni_cache


@pytest.fixture(scope="module")
def env(cache, recipe_ray) -> dict[str, str]:
    """A run's environment: the session's cache and Ray cluster."""
    return {**os.environ, "VERL_OMNI_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **recipe_ray}


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, env) -> Path:
    """2 steps with a checkpoint after each, the default validation (before training and after the last step) and
    two agent-loop workers (the batch split over them); the tiny model comes from the cache (model.path=null). A
    fresh interpreter, as a user types the command: the suite's one cold start of the recipe's driver, so an import
    that only fails in a fresh process (import order, a module the warm server happened to load) fails here."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = _main(run_dir, env, "trainer.total_training_steps=2", "trainer.save_freq=1", *TWO_AGENT_WORKERS, cold=True)
    (run_dir / "console.txt").write_text(proc.stdout + proc.stderr)
    return run_dir


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, env) -> Path:
    """PLAIN_STEPS steps straight through, without validation or checkpoints, on one agent-loop worker, losing a
    rollout replica (SIGKILL, as the OOM killer would) once KILL_STEPS[i] steps are logged, at a seeded fraction of
    an undisturbed step's time (so in the next step's rollout, update or weight sync, or at worst the one after,
    whatever the CPU's speed; a fixed delay landed two steps on in CI): the replica's requests are resent and it is
    replaced before that step is logged. The other tests compare this run with undisturbed runs."""
    run_dir = tmp_path_factory.mktemp("plain")
    overrides = (f"trainer.total_training_steps={PLAIN_STEPS}", "trainer.save_freq=-1", *NO_VALIDATION)
    proc = _run_until_a_step(run_dir, env, *overrides)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # a full pipe would block it
    reader.start()
    rng = random.Random(PLAIN_STEPS)
    try:
        for step in KILL_STEPS:
            while len(rows := _metrics(run_dir / "metrics.jsonl")) < step:  # steps before `step` logged: it has begun
                assert proc.poll() is None, "".join(output)[-3000:]
                time.sleep(0.02)
            # the fastest step so far is an undisturbed one (a step that started a replacement is many times longer)
            time.sleep(rng.uniform(0.0, 1.0) * min(r["data"]["timing_s/step"] for r in rows))
            victims = actor_pids("DiffusersRolloutServer")
            # the replacement of an earlier kill is up (it was refilled before its step was logged)
            assert len(victims) == 2, (step, victims, "".join(output)[-3000:])
            os.kill(rng.choice(victims), signal.SIGKILL)
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(output)[-5000:]
    return run_dir


def test_two_steps_train_end_to_end(two_step_run, cache):
    assert (cache / "tiny_sd3").is_dir()  # built locally (once per test session)
    rows = _metrics(two_step_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 2: the validation after the last step
    for row in rows[:2]:
        data = row["data"]
        assert math.isfinite(data["reward/mean"]) and math.isfinite(data["actor/loss"])
        # on-policy, bit for bit: batch-invariant mode (the default) runs sampling and recomputation at one
        # fixed chunk shape, here with 4-sample micro-batches padded to the 8-sample chunks of the rollout
        assert data["actor/ratio_max_abs_dev"] == 0.0 and data["actor/log_ratio_abs_mean"] == 0.0
        assert data["rollout_routing/colocation"] == 1.0  # default policy: prompt_uid_affinity
        # speed_aware (the diffusion default): both replicas timed by the balancer (by the validation rollout
        # before step 0's), the slowest / fastest ratio is what its name says
        slow, fast = data["rollout_routing/seconds_per_request_max"], data["rollout_routing/seconds_per_request_min"]
        assert slow >= fast > 0 and data["rollout_routing/replica_slowdown_max"] == slow / fast
        assert data["rollout/model_version"] == row["step"]
    # the start-up breakdown goes with the process's first step only
    startup = {k for r in rows for k in r["data"] if k.startswith("timing_s/startup/")}
    assert startup == {
        f"timing_s/startup/{p}" for p in ("ray", "replicas", "agent_loop_workers", "training_ranks", "total")
    }
    assert startup <= set(rows[0]["data"]) and rows[0]["data"]["timing_s/startup/total"] > 0
    samples = sorted(p.name for p in (two_step_run / "samples").glob("*.png"))
    assert samples == ["step_00001.png", "step_00002.png", "val_step_00000.png", "val_step_00002.png"]
    assert (two_step_run / "reward_curve.png").stat().st_size > 0
    step, path = find_latest_checkpoint(two_step_run / "checkpoints")
    trainer_state = load_checkpoint(path, weights_only=False)["trainer"]
    assert step == 2 and trainer_state["version"] == 2
    assert [v["step"] for v in trainer_state["val_history"]] == [0]  # the final validation follows the save


def test_known_noise_is_quiet_in_every_process(two_step_run):
    """The filters of verl_omni.utils.log_noise reach the Ray workers (installed when they import verl_omni, before
    verl): the replicas, agent-loop workers and training rank log none of the listed messages (each of them logs
    the first two, the replicas the third, when the filters are not installed: workers' logs reach the driver)."""
    console = (two_step_run / "console.txt").read_text()
    assert "start-up to the first step" in console
    for noise in ("No supported accelerator detected", "is registered but not available", "requires torchvision"):
        assert noise not in console


def test_validation_is_logged_and_leaves_training_unchanged(two_step_run, plain_run):
    """val/* at step 0 (before training) and 2 (after the last step), from 8 shipped prompts x 1 ODE sample; the
    training metrics equal those of a run without validation (and with one agent-loop worker, not two), bit for
    bit."""
    rows = _metrics(two_step_run / "metrics.jsonl")
    before, after = rows[0]["data"], rows[2]["data"]
    assert "val/reward/mean" not in rows[1]["data"]
    assert set(after) == {"val/reward/mean", "val/reward/std", "val/timing_s"}  # the final row is validation only
    for val in (before, after):
        assert math.isfinite(val["val/reward/mean"]) and val["val/reward/std"] > 0.0
    assert before["val/reward/mean"] != after["val/reward/mean"]  # two updates changed the policy's samples

    plain = _metrics(plain_run / "metrics.jsonl")
    assert [r["step"] for r in plain] == list(range(PLAIN_STEPS))
    assert not list((plain_run / "samples").glob("val_*.png"))
    for with_val, without in zip(rows[:2], plain[:2], strict=True):
        keys = {k for k in without["data"] if k.startswith(TRAINING_PREFIXES)} - set(REPLICA_FAULT_METRICS)
        assert len(keys) > 10
        assert {k: with_val["data"][k] for k in keys} == {k: without["data"][k] for k in keys}


def test_gpu_smoke_checker_accepts_a_real_two_step_run(two_step_run, tmp_path):
    """tests/gpu_smoke/run.sh checks each backend's run with embedded scripts: they must read what the recipe
    writes (2 training steps plus the validation line after the last one). Only the GPU run itself needs a GPU."""
    script = (REPO / "tests" / "gpu_smoke" / "run.sh").read_text()
    checker, processes = (part.split("\nPYEOF\n", 1)[0] for part in script.split("<<'PYEOF'\n")[1:3])
    (tmp_path / "check.py").write_text(checker)
    (tmp_path / "processes.py").write_text(processes)
    gpu_log = tmp_path / "gpu_processes.csv"
    gpu_log.write_text("101, 900 MiB\n102, 900 MiB\n")
    run = [str(two_step_run / "metrics.jsonl"), str(two_step_run / "config.yaml")]
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "check.py"), "diffusers", *run], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reward/mean" in proc.stdout and "== [diffusers] validation at step 2" in proc.stdout
    assert "images/s" in proc.stdout and "actor/ratio_max_abs_dev" in proc.stdout
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "processes.py"), str(gpu_log)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "processes seen on the GPU: 2" in proc.stdout, proc.stdout + proc.stderr


def test_lost_replicas_are_replaced_and_no_sample_is_lost(plain_run, two_step_run):
    """plain_run lost a replica in each of KILL_STEPS; every step still trained on full groups, on-policy, and each
    lost replica's slot serves again from the step it was lost in (its replacement got that step's weights). Its
    rewards equal the undisturbed runs' (the tests above and below); throughput is reported, not asserted."""
    rows = [r["data"] for r in _metrics(plain_run / "metrics.jsonl")]
    assert len(rows) == PLAIN_STEPS
    for step, data in enumerate(rows):
        assert data["reward/num_groups"] == 2 and data["reward/group_size_min"] == 4, step  # no sample lost
        assert data["actor/ratio_max_abs_dev"] == 0.0 and data["rollout/model_version"] == step
        assert data["weight_sync/driver_bytes"] == 0.0  # the weights went from the actor to the replicas
    # a kill lands in its step's rollout, update or weight sync: noticed at that step's weight sync at the latest
    final = rows[-1]
    assert (final["rollout/replicas_lost"], final["rollout/replicas_replaced"]) == (2, 2)
    assert all(data["rollout/replicas_live"] == 2 for data in rows)  # each slot refilled before the step's log
    undisturbed = [r["data"] for r in _metrics(two_step_run / "metrics.jsonl")[:2]]
    for key in ("timing_s/rollout", "timing_s/weight_sync"):  # a replacement's start-up is in its weight sync
        print(
            f"{key} per step, replicas killed after steps {KILL_STEPS}: {[round(d[key], 2) for d in rows]}; "
            f"undisturbed run: {[round(d[key], 2) for d in undisturbed]}"
        )


def test_resume_continues_like_an_uninterrupted_run(two_step_run, plain_run, env):
    # test_freq=2: the resumed run validates the checkpoint's policy before step 2, then after the last step
    first_run = _metrics(two_step_run / "metrics.jsonl")
    _main(
        two_step_run, env, f"trainer.total_training_steps={PLAIN_STEPS}", "trainer.save_freq=1", "trainer.test_freq=2"
    )
    # one metrics file: the steps logged before the checkpoint, then the resumed ones; the first launch's
    # final validation at step 2 is replaced by the resumed run's step 2, never duplicated
    rows = _metrics(two_step_run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(PLAIN_STEPS + 1)) and rows[:2] == first_run[:2]
    resumed = rows[2:PLAIN_STEPS]

    straight = _metrics(plain_run / "metrics.jsonl")
    # same prompts, seeds and weights: the resumed steps are the uninterrupted run's steps, bit for bit (in
    # batch-invariant mode a sample does not depend on what the admission window fused it with, so machine load
    # cannot change it), and so are the steps plain_run sampled on replacement replicas
    for key in ("reward/mean", "reward/std", "actor/pg_loss", "actor/grad_norm"):
        assert [r["data"][key] for r in resumed] == [r["data"][key] for r in straight[2:]], key
    # fixed validation seeds: the same policy (after 2 steps) validated in another process scores the same
    assert resumed[0]["data"]["val/reward/mean"] == first_run[2]["data"]["val/reward/mean"]


def _run_until_a_step(run_dir: Path, env: dict[str, str], *overrides: str) -> warm_recipe.WarmRecipe:
    """The recipe as a process of its own, returned once it has logged its first training step."""
    args = [f"trainer.default_local_dir={run_dir}", *FAST, *overrides]
    proc = warm_recipe.start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.is_file() and '"reward/mean"' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("run ended or stalled before its first step: " + proc.communicate()[0][-3000:])
        time.sleep(0.05)
    return proc


def test_sigterm_checkpoints_exits_0_and_the_rerun_resumes_exactly(plain_run, env, tmp_path):
    """Preemption: SIGTERM lets the step in flight finish, writes a checkpoint and exits 0 (no checkpoint was due:
    save_freq=-1); the same command then continues like the uninterrupted run."""
    run_dir = tmp_path / "preempted"
    # as many steps as plain_run: a tiny step is ~0.35 s on a fast core, so the signal must find steps left
    overrides = (
        f"trainer.total_training_steps={PLAIN_STEPS}",
        "trainer.save_freq=-1",
        "trainer.sample_freq=-1",
        *NO_VALIDATION,
        *ONE_REPLICA,  # the same samples as plain_run's two (batch-invariant mode: routing never changes a sample)
    )
    proc = _run_until_a_step(run_dir, env, *overrides)
    try:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: stopped after step" in out and "run the same command to resume" in out
    step, path = find_latest_checkpoint(run_dir / "checkpoints")
    assert load_checkpoint(path, weights_only=False)["trainer"]["step"] == step in range(1, PLAIN_STEPS)

    _main(run_dir, env, *overrides)
    rows = [r["data"] for r in _metrics(run_dir / "metrics.jsonl") if "reward/mean" in r["data"]]
    straight = [r["data"] for r in _metrics(plain_run / "metrics.jsonl") if "reward/mean" in r["data"]]
    assert len(rows) == len(straight) == PLAIN_STEPS
    for key in ("reward/mean", "reward/std", "actor/pg_loss", "actor/grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in straight], key


def test_ctrl_c_twice_stops_at_once_and_leaves_last_checkpoint_intact(env, tmp_path):
    run_dir = tmp_path / "interrupted"
    proc = _run_until_a_step(run_dir, env, "trainer.total_training_steps=200", "trainer.save_freq=1", *ONE_REPLICA)
    try:
        deadline = time.monotonic() + 120  # the step's metrics are logged before its checkpoint is written
        while find_latest_checkpoint(run_dir / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        seen = []
        for line in proc.stdout:  # the first signal is handled (two at once would arrive as one)
            seen.append(line)
            if "SIGINT received" in line:
                break
        proc.send_signal(signal.SIGINT)
        out = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command to resume" in out
    step, path = find_latest_checkpoint(run_dir / "checkpoints")
    state = load_checkpoint(path, weights_only=False)
    assert state["trainer"]["step"] == step >= 1
