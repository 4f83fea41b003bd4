"""The algorithms of ``algorithm.name`` (and ``rollout.diffusion.sde_type``) side by side on the CPU colour task.

Each (algorithm, seed) is one run of the recipe (a subprocess, as a user runs it) on the tiny default
(``geneval_color``, 8 prompts x 8 samples, 8 denoising steps), each algorithm with its recommended settings and the
same seeds, prompts and validation set; nothing else changes (learning rate, clip range, batch). Runs are
interleaved (seed by seed) so that load on the machine hits every algorithm alike.

Reported per algorithm, as mean +- standard deviation over the seeds: the validation reward (24 held-out prompts,
fixed seeds, ODE sampling) at step 0 and every ``--val-every`` steps, the median seconds per step, the seconds per
trained sample (step time / samples with a nonzero advantage) and the trained transitions per step (samples x
trained denoising steps). A JSON file with every run's numbers and a PNG of the validation curves are written
under ``--out``.

Run: ``python -m benchmarks.algorithms --steps 40 --val-every 10 --seeds 1 2 3`` (one recipe run per algorithm and
seed; with ``data.train_batch_size=4`` the 18 runs took 31 minutes on 2 cores); trailing ``key=value`` arguments are
recipe overrides for every algorithm (e.g. ``data.train_batch_size=4`` for half the prompts per step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

# Recommended settings, from the papers and the authors' configs (docs/advanced_features/algorithms.md); GRPO-Guard
# and CPS alone on FlowGRPO's defaults. DiffusionNFT's "trained transitions" are (sample, noise level) pairs.
# Flow-GRPO-Fast: a 2-step window in the first half of the schedule, CPS at noise level 0.8, no CFG (the tiny
# default has none); MixGRPO: its 4-step window, moved one step every `shift_every` steps so that it crosses the
# tiny schedule's positions during the run (set from --steps below).
CPS, CPS_NOISE = (
    "actor_rollout_ref.rollout.diffusion.sde_type=cps",
    "actor_rollout_ref.rollout.diffusion.noise_level=0.8",
)
ALGORITHMS: dict[str, list[str]] = {
    "flow_grpo": [],
    "flow_grpo+cps": [
        "actor_rollout_ref.rollout.diffusion.sde_type=cps",
        "actor_rollout_ref.rollout.diffusion.noise_level=0.8",
    ],
    "flow_grpo_fast": [
        "algorithm.name=flow_grpo_fast",
        CPS,
        CPS_NOISE,
    ],
    "mix_grpo": ["algorithm.name=mix_grpo"],
    "grpo_guard": ["algorithm.name=grpo_guard"],
    # DiffusionNFT: the authors' defaults (beta 1, Z 5, old-policy decay type 1, no CFG), with their global reward std
    # (config/base.py: sample.global_std = True); it samples deterministically, so noise_level plays no part
    "diffusion_nft": ["algorithm.name=diffusion_nft", "algorithm.global_std=true"],
}


def run(name: str, seed: int, args: argparse.Namespace) -> dict:
    """One recipe run: its validation rewards by step and its timings."""
    run_dir = Path(args.out) / f"{name}-seed{seed}"
    extra = list(ALGORITHMS[name])
    if name == "mix_grpo":  # 4 positions of a 4-step window in the 7 trained steps: cross them once per run
        extra.append(f"algorithm.mix.shift_every={max(1, args.steps // 4)}")
    command = [
        sys.executable,
        "-m",
        "recipes.flowgrpo.main",
        f"trainer.seed={seed}",
        f"trainer.total_training_steps={args.steps}",
        f"trainer.test_freq={args.val_every}",
        "trainer.val_before_train=true",
        "trainer.save_freq=-1",
        "trainer.sample_freq=-1",
        "trainer.logger=[file]",
        f"trainer.default_local_dir={run_dir}",
        *extra,
        *args.overrides,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict:
    """A finished run's validation rewards by step and its timings, from its ``metrics.jsonl``."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    rows = [{"step": r.get("step"), **r.get("data", r)} for r in rows]
    train = [r for r in rows if "timing_s/step" in r]
    kept = [r["advantages/kept_fraction"] * r["reward/num_groups"] * r["reward/group_size_max"] for r in train]
    pairs = [(r, k) for r, k in zip(train, kept, strict=True) if k]  # a step with every advantage 0 trains nothing
    return {
        "val": {int(r["step"]): r["val/reward/mean"] for r in rows if "val/reward/mean" in r},
        "step_s": statistics.median(r["timing_s/step"] for r in train),
        "s_per_trained_sample": statistics.median(r["timing_s/step"] / k for r, k in pairs),
        "transitions_per_step": statistics.mean(k * r["actor/trained_steps"] for r, k in pairs),
    }


def mean_sd(values: list[float]) -> str:
    """Mean +- sample standard deviation over seeds, as the benchmarks print it."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--out", default="outputs/bench_algorithms")
    parser.add_argument("--report", action="store_true", help="only summarise the runs already under --out")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, for every algorithm")
    args = parser.parse_args(argv)
    results: dict[str, list[dict]] = {name: [] for name in args.algorithms}
    for seed in args.seeds:
        for name in args.algorithms:  # interleaved: load changes hit every algorithm alike
            run_dir = Path(args.out) / f"{name}-seed{seed}"
            if args.report:
                if not (run_dir / "metrics.jsonl").exists() or (run_dir / "metrics.jsonl").stat().st_size == 0:
                    continue
                finished = read_run(run_dir)
                if max(finished["val"], default=-1) < args.steps:  # still running, or stopped early
                    continue
            else:
                finished = run(name, seed, args)
            results[name].append(finished)
            print(f"{name:>15} seed {seed}: {json.dumps(finished)}", flush=True)
    results = {name: rows for name, rows in results.items() if rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))

    steps = sorted(set.intersection(*(set(r["val"]) for rows in results.values() for r in rows)))
    print(f"\n{args.steps} steps; validation reward (mean +- sd over seeds) at steps {steps}")
    header = "".join(f"{'val@' + str(s):>17}" for s in steps)
    print(f"{'algorithm':>15}{'seeds':>6}{header}{'s/step':>9}{'s/trained sample':>18}{'transitions/step':>18}")
    for name, rows in results.items():
        vals = "".join(f"{mean_sd([r['val'][s] for r in rows]):>17}" for s in steps)
        step_s = statistics.mean(r["step_s"] for r in rows)
        per_sample = statistics.mean(r["s_per_trained_sample"] for r in rows)
        transitions = statistics.mean(r["transitions_per_step"] for r in rows)
        print(f"{name:>15}{len(rows):>6}{vals}{step_s:>9.2f}{per_sample:>18.4f}{transitions:>18.1f}")
    _plot(results, steps, Path(args.out) / "algorithms_val_reward.png")


def _plot(results: dict[str, list[dict]], steps: list[int], path: Path) -> None:
    """Validation reward against training step, mean and spread over the seeds, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        means = [statistics.mean(r["val"][s] for r in rows) for s in steps]
        sds = [statistics.stdev([r["val"][s] for r in rows]) if len(rows) > 1 else 0.0 for s in steps]
        ax.errorbar(steps, means, yerr=sds, label=name, capsize=3, marker="o")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation reward (geneval_color)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
