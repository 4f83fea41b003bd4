"""``trainer.rollout_mode`` side by side: ``sync`` against ``one_step_off`` on the tiny default, same seeds.

Each (mode, seed) is one run of the recipe (a subprocess, as a user runs it) with validation at step 0 and after
the last step. Reported per mode: the median seconds per step (the first step excluded: it has nothing to overlap
with), steps per second relative to ``sync``, and the validation reward after the last step, as mean and spread
over the seeds. Equal threads: both modes use the recipe's replicas and training rank as configured.

Run: ``python -m benchmarks.rollout_mode_bench --steps 20 --seeds 1 2 3`` (minutes: one recipe run per mode and
seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("sync", "one_step_off")


def run(mode: str, seed: int, steps: int, out_dir: Path, extra: list[str]) -> dict[str, float]:
    """One recipe run; its median step seconds (steps 2+) and its last validation reward."""
    run_dir = out_dir / f"{mode}-seed{seed}"
    command = [
        sys.executable,
        "-m",
        "recipes.flowgrpo.main",
        f"trainer.rollout_mode={mode}",
        f"trainer.seed={seed}",
        f"trainer.total_training_steps={steps}",
        f"trainer.test_freq={steps}",
        "trainer.save_freq=-1",
        "trainer.sample_freq=-1",
        f"trainer.default_local_dir={run_dir}",
        *extra,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r.get("data", r) for r in rows]
    step_s = [r["timing_s/step"] for r in rows if "timing_s/step" in r][1:]
    val = [r["val/reward/mean"] for r in rows if "val/reward/mean" in r]
    return {"step_s": statistics.median(step_s), "val": val[-1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, for both modes")
    args = parser.parse_args(argv)
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="rollout_mode_bench_") as tmp:
        for seed in args.seeds:
            for mode in MODES:  # interleaved, so load changes hit both modes alike
                results[mode].append(run(mode, seed, args.steps, Path(tmp), args.overrides))
                print(f"{mode:>13} seed {seed}: {results[mode][-1]}", flush=True)
    base = statistics.median(r["step_s"] for r in results["sync"])
    print(f"\n{args.steps} steps, seeds {args.seeds}")
    print(f"{'mode':>13}  {'s/step (median)':>15}  {'steps/s vs sync':>15}  {'val reward (mean +- sd)':>24}")
    for mode, rows in results.items():
        step_s = statistics.median(r["step_s"] for r in rows)
        vals = [r["val"] for r in rows]
        spread = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{mode:>13}  {step_s:>15.3f}  {base / step_s:>14.2f}x  {statistics.mean(vals):>15.3f} +- {spread:.3f}")


if __name__ == "__main__":
    main()
