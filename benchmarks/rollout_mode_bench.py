"""``trainer.rollout_mode`` side by side: ``sync`` against ``one_step_off`` on the tiny default, same seeds.

Modes: ``sync``; ``one_step_off`` (its default: stale transitions re-centred on the current means,
``actor.recentre_stale``); ``one_step_off, as drawn`` (``recentre_stale=false``: the stale transitions scored as
sampled); ``one_step_off, 1 replica`` (one rollout thread beside the trainer's instead of two, so as many busy
threads as ``sync`` has while it samples; the same samples, under batch-invariant mode). ``--modes`` picks some; the
default runs the first three, which use the recipe's replicas and training rank as configured. Each (mode, seed) is
one run of the recipe (a subprocess, as a user runs it) with validation at step 0 and after the last step. Reported
per mode: the median seconds per step (the first step excluded: it has nothing to overlap with), steps per second
relative to ``sync``, the training reward of the last 5 steps and the validation reward after the last step, each as
mean and spread over the seeds.

Also the CPU-seconds a steady step takes, over every process of the run (sampled as each step's metrics line
lands), and from sync's the floor on this machine's cores: no schedule of a step's work can take less than its
CPU-seconds divided by the cores, so that floor bounds what overlapping the rollout with the update can gain.

Run: ``python -m benchmarks.rollout_mode_bench --steps 20 --seeds 1 2 3`` (minutes: one recipe run per mode and
seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.algorithms import mean_sd
from benchmarks.process_tree_cpu import ProcessTreeCPU

MODES = {
    "sync": ["trainer.rollout_mode=sync"],
    "one_step_off": ["trainer.rollout_mode=one_step_off"],
    "one_step_off, as drawn": ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.actor.recentre_stale=false"],
    # one rollout thread beside the trainer's: two busy threads on two cores while both run, as sync's two replicas
    "one_step_off, 1 replica": ["trainer.rollout_mode=one_step_off", "actor_rollout_ref.rollout.n_gpus_per_node=1"],
}


def run(mode: str, seed: int, steps: int, out_dir: Path, extra: list[str]) -> dict[str, float]:
    """One recipe run: its median step seconds (steps 2+), its CPU-seconds per step over steps 2 to the one before
    the last (every process of the run, sampled as each step's metrics line lands), the mean training reward of its
    last 5 steps and its last validation reward."""
    run_dir = out_dir / f"{mode.replace(', ', '-').replace(' ', '_')}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "recipes.flowgrpo.main",
        *MODES[mode],
        f"trainer.seed={seed}",
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={steps}",
        "trainer.save_freq=-1",
        "trainer.sample_freq=-1",
        f"trainer.default_local_dir={run_dir}",
        *extra,
    ]
    metrics = run_dir / "metrics.jsonl"
    cpu_at_step: dict[int, float] = {}  # steps done -> the tree's CPU-s when that step's line was first seen
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    tree = ProcessTreeCPU(driver.pid)
    while driver.poll() is None:
        cpu = tree.sample()
        done = _steps_done(metrics)
        cpu_at_step.setdefault(done, cpu)
        time.sleep(0.1)
    if driver.returncode != 0:
        raise subprocess.CalledProcessError(driver.returncode, command)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r.get("data", r) for r in rows]
    step_s = [r["timing_s/step"] for r in rows if "timing_s/step" in r][1:]
    val = [r["val/reward/mean"] for r in rows if "val/reward/mean" in r]
    train = [r["reward/mean"] for r in rows if "reward/mean" in r]
    first, last = 1, steps - 1  # after step 1 (nothing to overlap), before the last (no rollout ahead, validation)
    if first not in cpu_at_step or last not in cpu_at_step or last <= first:
        raise RuntimeError(f"{mode} seed {seed}: steps {first} and {last} were not both seen; use --steps >= 3")
    cpu_per_step = (cpu_at_step[last] - cpu_at_step[first]) / (last - first)
    return {
        "step_s": statistics.median(step_s),
        "cpu_s_per_step": cpu_per_step,
        "train_last5": statistics.mean(train[-5:]),
        "val": val[-1],
    }


def _steps_done(metrics: Path) -> int:
    """Training steps logged so far (validation-only lines do not count)."""
    try:
        return sum('"timing_s/step"' in line for line in metrics.read_text().splitlines())
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES)[:3], metavar="MODE")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, for every mode")
    args = parser.parse_args(argv)
    if "sync" not in args.modes:
        parser.error("--modes must include sync: the other modes are reported relative to it")
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory(prefix="rollout_mode_bench_") as tmp:
        for seed in args.seeds:
            for mode in args.modes:  # interleaved, so load changes hit every mode alike
                results[mode].append(run(mode, seed, args.steps, Path(tmp), args.overrides))
                print(f"{mode:>13} seed {seed}: {results[mode][-1]}", flush=True)
    base = statistics.median(r["step_s"] for r in results["sync"])
    cores = len(os.sched_getaffinity(0))
    print(f"\n{args.steps} steps, seeds {args.seeds}, {cores} cores")
    print(
        f"{'mode':>22}  {'s/step (median)':>15}  {'steps/s vs sync':>15}  {'CPU-s/step':>10}  "
        f"{'train reward, last 5':>20}  {'val reward':>15}"
    )
    for mode, rows in results.items():
        step_s = statistics.median(r["step_s"] for r in rows)
        cpu_s = statistics.median(r["cpu_s_per_step"] for r in rows)
        print(
            f"{mode:>22}  {step_s:>15.3f}  {base / step_s:>14.2f}x  {cpu_s:>10.2f}  "
            f"{mean_sd([r['train_last5'] for r in rows]):>20}  {mean_sd([r['val'] for r in rows]):>15}"
        )
    # No schedule of a step's work on `cores` cores takes less than its CPU-seconds / cores: overlapping the rollout
    # with the update can gain at most sync's step time over that floor (sync's work: the overlap adds, not removes).
    floor = statistics.median(r["cpu_s_per_step"] for r in results["sync"]) / cores
    print(
        f"\nfloor on {cores} cores: sync's CPU-s per step / {cores} = {floor:.3f} s a step, so no overlap of this "
        f"work can run more than {base / floor:.2f}x sync's steps per second here"
    )


if __name__ == "__main__":
    main()
