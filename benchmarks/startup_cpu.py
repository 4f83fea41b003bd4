"""Where a recipe run's start-up goes: CPU-seconds per process (the driver, Ray's own processes, each actor).

    python -m benchmarks.startup_cpu --rounds 2 [--baseline <git rev>] [-- <recipe overrides>]

Runs ``python -m recipes.flowgrpo.main`` for one training step, samples every process of its tree (the driver,
the local Ray it starts, Ray's workers and actors) with psutil, and prints CPU-seconds per role and the recipe's own
start-up line. On 2 cores start-up is CPU-bound, so CPU-seconds say what a change saves even on a loaded machine,
where wall times do not. ``--baseline``: the same run from a git worktree of that revision, interleaved round by
round with this checkout's, and the ratio of the totals.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.process_tree_cpu import ProcessTreeCPU

REPO = Path(__file__).resolve().parents[1]
STARTUP_LINE = re.compile(r"start-up to the first step [^\r\n]*")  # tqdm.write may follow a bar's \r
ONE_STEP = ["trainer.total_training_steps=1", "trainer.test_freq=-1", "trainer.val_before_train=false"]


def measure(root: Path, overrides: list[str], run_dir: Path) -> tuple[dict[str, list[float]], str, float, float]:
    """One run from checkout ``root``: CPU-seconds per role (one entry per process), the start-up line, wall s, and
    the CPU-seconds the whole tree had used when the start-up line appeared (the work before the first step)."""
    cmd = [sys.executable, "-m", "recipes.flowgrpo.main", f"trainer.default_local_dir={run_dir}", *ONE_STEP, *overrides]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a run of its own, as `make demo`
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        driver = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        tree = ProcessTreeCPU(driver.pid)
        before_first_step = float("nan")
        while driver.poll() is None:
            cpu = tree.sample()
            if before_first_step != before_first_step:  # nan: not seen yet
                written = os.pread(out.fileno(), os.fstat(out.fileno()).st_size, 0)  # the run's offset untouched
                if STARTUP_LINE.search(written.decode(errors="replace")):
                    before_first_step = cpu
            time.sleep(0.25)
        wall = time.monotonic() - start
        out.seek(0)
        log = out.read()
    if driver.returncode != 0:
        raise RuntimeError(f"the run from {root} failed:\n{log[-3000:]}")
    found = STARTUP_LINE.search(log)
    return tree.by_role(), found.group(0) if found else "(no start-up line)", wall, before_first_step


def _table(runs: list[dict[str, list[float]]]) -> tuple[list[str], float]:
    """Rows: role, processes, median CPU-s per run; and the median total."""
    names = sorted({name for run in runs for name in run}, key=lambda n: -max(sum(r.get(n, [0.0])) for r in runs))
    rows = []
    for name in names:
        per_run = [sum(run.get(name, [])) for run in runs]
        count = max(len(run.get(name, [])) for run in runs)
        rows.append(f"| {name} | {count} | {statistics.median(per_run):.1f} |")
    total = statistics.median(sum(sum(v) for v in run.values()) for run in runs)
    return rows, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="a git revision to compare with, run from a temporary worktree")
    parser.add_argument("overrides", nargs="*", help="recipe overrides (after --)")
    args = parser.parse_args(argv)
    checkouts = {"this checkout": REPO}
    with tempfile.TemporaryDirectory(prefix="startup-cpu-") as tmp:
        if args.baseline:
            worktree = Path(tmp) / "baseline"
            add = ["git", "worktree", "add", "-q", "--detach", str(worktree), args.baseline]
            subprocess.run(add, cwd=REPO, check=True)
            checkouts = {f"baseline {args.baseline}": worktree, **checkouts}
        try:
            results: dict[str, list] = {name: [] for name in checkouts}
            firsts: dict[str, list[float]] = {name: [] for name in checkouts}
            for round_ in range(args.rounds):
                for index, (name, root) in enumerate(checkouts.items()):  # interleaved: load hits both alike
                    load = os.getloadavg()[0]
                    run_dir = Path(tmp) / f"run-{round_}-{index}"  # a fresh directory: nothing to resume
                    roles, line, wall, before_first_step = measure(root, args.overrides, run_dir)
                    results[name].append(roles)
                    firsts[name].append(before_first_step)
                    print(
                        f"[{name}, round {round_ + 1}, load {load:.1f}] {wall:.1f} s wall; {line}; "
                        f"{before_first_step:.1f} CPU-s before the first step",
                        flush=True,
                    )
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=False)
    totals = {}
    cores = len(os.sched_getaffinity(0))
    for name, runs in results.items():
        rows, totals[name] = _table(runs)
        print(f"\n{name}: CPU-seconds per role, median of {len(runs)} run(s) of one training step")
        print("| role | processes | CPU-s |\n| --- | --- | --- |")
        print("\n".join(rows))
        print(f"| total | | {totals[name]:.1f} |")
        before = statistics.median(firsts[name])
        print(
            f"before the first step: {before:.1f} CPU-s (median), so on {cores} cores no schedule of this start-up "
            f"reaches its first step in under {before / cores:.1f} s"
        )
    if args.baseline:
        base, ours = totals.values()
        print(f"\nthis checkout / baseline, total CPU-seconds: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
