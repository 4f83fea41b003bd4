"""Rollout and step time with a slow reward scored in-line (after the whole batch is sampled) vs overlapped (each
group as soon as its images are back), measured side by side in one run.

Runs the CPU recipe (``python -m recipes.flowgrpo.main``, the tiny model, 8 prompts x 8 samples per step over
2 replicas and 2 agent-loop workers) once per mode, the modes interleaved over ``--rounds``, with a reward that
costs ``--seconds-per-image`` (the colour reward plus a sleep; one scorer per agent-loop worker, which scores one
batch at a time, like one GPU). Reports the median over steps (the first step of each run left out: warm-up) of
``timing_s/rollout`` (sampling + the reward time not hidden; what overlap changes), ``timing_s/step`` (with the
policy update, which overlap does not change) and ``timing_s/reward_exposed``, and the ratios in-line /
overlapped.

    python -m benchmarks.reward_overlap_bench [--steps 5] [--rounds 1] [--seconds-per-image 0.2] [overrides...]

Overlap hides at most the sampling time: the gain is largest when a worker's sampling and scoring take about as
long, and groups come back one after another (``actor_rollout_ref.rollout.diffusion.max_num_seqs=8``: one group
per replica batch) rather than all at once.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from verl_omni.rewards import get_reward_fn

REPO = Path(__file__).resolve().parents[1]
MODES = {"in-line": "false", "overlapped": "true"}
_SCORER = threading.Lock()  # one scorer per process: concurrent calls queue, as on one GPU
_COLOR = None


def slow_color(images: torch.Tensor, prompts: list[str], seconds_per_image: float = 0.2) -> torch.Tensor:
    """The colour reward, made to cost ``seconds_per_image`` per image (the benchmark's slow scorer).

    The sleep stands for a scorer elsewhere (a GPU, a reward service); the colour arithmetic itself runs on one
    thread, so the worker's scoring threads do not each start a team of OpenMP threads that compete with the
    replicas and the trainer for the CPU (they would measure this machine's core count, not the overlap).
    """
    global _COLOR
    with _SCORER:
        if _COLOR is None:
            torch.set_num_threads(1)
            _COLOR = get_reward_fn("geneval_color")
        time.sleep(seconds_per_image * len(prompts))
        return _COLOR(images, prompts)


def run_recipe(run_dir: Path, overlap: str, steps: int, seconds_per_image: float, extra: list[str]) -> list[dict]:
    """One training run; returns its per-step metrics."""
    cmd = [
        sys.executable,
        "-m",
        "recipes.flowgrpo.main",
        f"trainer.default_local_dir={run_dir}",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=-1",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.sample_freq=-1",
        "trainer.logger=[file]",
        "reward.name=benchmarks.reward_overlap_bench:slow_color",
        f"+reward.kwargs.seconds_per_image={seconds_per_image}",
        f"reward.overlap={overlap}",
        *extra,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the {overlap=} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _metric(row: dict, key: str) -> float:
    value = row.get(key, row.get("data", {}).get(key))
    return float(value) if value is not None else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds-per-image", type=float, default=0.2)
    parser.add_argument("overrides", nargs="*", help="recipe overrides for both modes")
    args = parser.parse_args()
    keys = ("timing_s/rollout", "timing_s/step", "timing_s/reward_exposed")
    samples: dict[str, dict[str, list[float]]] = {mode: {k: [] for k in keys} for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for mode, overlap in MODES.items():
                run_dir = Path(tmp) / f"{mode}-{round_}"
                rows = run_recipe(run_dir, overlap, args.steps, args.seconds_per_image, args.overrides)
                for row in rows[1:]:  # the first step warms up (model load, first Ray calls)
                    for key in keys:
                        samples[mode][key].append(_metric(row, key))
    print(
        f"slow reward: {args.seconds_per_image} s per image; {args.steps - 1} measured steps x {args.rounds} round(s)"
    )
    print(f"{'mode':<12}" + "".join(f"{k:>28}" for k in keys))
    medians = {mode: {k: statistics.median(v) for k, v in per.items()} for mode, per in samples.items()}
    for mode, per in medians.items():
        print(f"{mode:<12}" + "".join(f"{per[k]:>28.2f}" for k in keys))
    for key in keys[:2]:
        ratio = medians["in-line"][key] / medians["overlapped"][key]
        print(f"{key} in-line / overlapped: {ratio:.2f}x")


if __name__ == "__main__":
    main()
