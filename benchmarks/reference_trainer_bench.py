"""Step time against the FlowGRPO paper's trainer (``yifan123/flow_grpo``), at equal threads, in both rollout modes.

One invocation runs, side by side on the same tiny pretrained SD3 directory and the same work (8 prompts x 8
samples a step, 8 denoising steps, 64 px, full fine-tuning, 7 trained steps, 16 samples per optimizer step in
micro-batches of 8, ``jpeg_compressibility`` reward, no CFG, no KL, no EMA, no validation):

- the reference trainer (``scripts/train_sd3.py``, unmodified) in its own environment, launched through
  :mod:`benchmarks.reference_trainer_wrapper` (config set from outside, epoch start times recorded);
- our recipe (``python -m recipes.flowgrpo.main``) with ``trainer.rollout_mode=sync`` and ``one_step_off``.

Equal threads: every process of a run (for ours: Ray, the replicas, the training worker) is pinned to the same
``T`` cores (CPU affinity), and at most ``T`` compute threads are busy at once: the reference runs one process with
``T`` torch threads; ours ``sync`` samples on ``T`` replicas x 1 thread, then trains on 1 thread (the recipe's
default layout at ``T = 2``; a 2-thread trainer collapsed under the shared machine's load, 40 s a step, measured);
ours ``one_step_off`` samples on 1 replica x 1 thread while it trains on 1 thread (at ``T = 1`` both share the one
core, so the overlap cannot gain there).

Reported per (threads, trainer): seconds per step (the first step of each run excluded; for ``one_step_off`` the
last too, which has nothing to sample ahead), as the median of each run's median and the range over runs;
start-up (process start to the first step); ratios ours / reference. Runs are interleaved (round by round, trainer
by trainer, the order rotated each round) so machine load hits all alike.

Run::

    python -m benchmarks.reference_trainer_bench --reference-dir /tmp/flow_grpo \\
        --reference-python /tmp/venv-ref/bin/python --steps 10 --threads 1 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WRAPPER = Path(__file__).resolve().parent / "reference_trainer_wrapper.py"
PROMPTS = REPO / "recipes" / "flowgrpo" / "data"

PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 8
DENOISING_STEPS = 8
RESOLUTION = 64
MICRO_BATCH = 8
MINI_BATCH = 16  # samples per optimizer step
LR = 3e-4
CLIP = 2e-2
TIMESTEP_FRACTION = 0.99
NOISE_LEVEL = 0.7
SEED = 42
TRAINERS = ("reference", "sync", "one_step_off")


@dataclass
class Run:
    """One trainer run's measurements."""

    trainer: str
    threads: int
    step_s: list[float]  # every step after the first
    startup_s: float
    load: float  # 1-minute load average when the run started


def steady(run: Run) -> list[float]:
    """The run's steady-state steps: ``one_step_off``'s last step samples nothing ahead, so it is left out too."""
    return run.step_s[:-1] if run.trainer == "one_step_off" else run.step_s


@dataclass
class Results:
    """Every run, by (threads, trainer)."""

    runs: dict[tuple[int, str], list[Run]] = field(default_factory=dict)

    def add(self, run: Run) -> None:
        self.runs.setdefault((run.threads, run.trainer), []).append(run)


def _pin(cores: set[int]):
    """A ``preexec_fn`` pinning the child (and everything it starts) to ``cores``."""

    def pin() -> None:
        os.sched_setaffinity(0, cores)

    return pin


def _thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def reference_config(model_dir: Path, dataset_dir: Path, log_dir: Path) -> dict[str, object]:
    """The reference's config keys (its ``config/base.py`` names) for the benchmark's work."""
    return {
        "seed": SEED,
        "logdir": str(log_dir),
        "save_dir": str(log_dir),
        "save_freq": 10**9,
        "eval_freq": 10**9,
        "mixed_precision": "no",
        "allow_tf32": False,
        "use_lora": False,
        "dataset": str(dataset_dir),
        "resolution": RESOLUTION,
        "pretrained.model": str(model_dir),
        "prompt_fn": "general_ocr",  # prompts from <dataset>/train.txt
        "reward_fn": {"jpeg_compressibility": 1.0},
        "per_prompt_stat_tracking": True,
        "sample.num_steps": DENOISING_STEPS,
        "sample.eval_num_steps": DENOISING_STEPS,
        "sample.guidance_scale": 1.0,
        "sample.noise_level": NOISE_LEVEL,
        "sample.global_std": False,
        # one prompt x 8 samples per sampling batch, 8 batches: 8 prompts x 8 samples a step
        "sample.train_batch_size": SAMPLES_PER_PROMPT,
        "sample.num_image_per_prompt": SAMPLES_PER_PROMPT,
        "sample.num_batches_per_epoch": PROMPTS_PER_STEP,
        "sample.test_batch_size": SAMPLES_PER_PROMPT,
        # it trains on num_batches_per_epoch micro-batches of (kept samples / num_batches_per_epoch): 8
        "train.batch_size": MICRO_BATCH,
        "train.gradient_accumulation_steps": MINI_BATCH // MICRO_BATCH,
        "train.num_inner_epochs": 1,
        "train.timestep_fraction": TIMESTEP_FRACTION,
        "train.learning_rate": LR,
        "train.clip_range": CLIP,
        "train.adv_clip_max": 5,
        "train.max_grad_norm": 1.0,
        "train.adam_weight_decay": 1e-4,
        "train.cfg": False,
        "train.beta": 0.0,
        "train.ema": False,
    }


def our_overrides(mode: str, threads: int, steps: int, model_dir: Path, run_dir: Path) -> list[str]:
    """Recipe overrides for the same work; the thread layout as the module docstring says."""
    replicas, train_threads = (threads, 1) if mode == "sync" else (1, 1)
    return [
        f"trainer.rollout_mode={mode}",
        f"trainer.total_training_steps={steps + 1}",
        f"trainer.seed={SEED}",
        "trainer.test_freq=-1",
        "trainer.val_before_train=false",
        "trainer.save_freq=-1",
        "trainer.sample_freq=-1",
        "trainer.logger=[file]",
        "trainer.resume_mode=disable",
        f"trainer.cpu_threads={train_threads}",
        f"trainer.default_local_dir={run_dir}",
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.model.lora_rank=0",
        f"actor_rollout_ref.rollout.n_gpus_per_node={replicas}",
        "actor_rollout_ref.rollout.diffusion.cpu_threads=1",
        f"actor_rollout_ref.rollout.n={SAMPLES_PER_PROMPT}",
        f"actor_rollout_ref.rollout.diffusion.num_inference_steps={DENOISING_STEPS}",
        f"actor_rollout_ref.rollout.diffusion.height={RESOLUTION}",
        f"actor_rollout_ref.rollout.diffusion.width={RESOLUTION}",
        "actor_rollout_ref.rollout.diffusion.guidance_scale=1.0",
        f"actor_rollout_ref.rollout.diffusion.noise_level={NOISE_LEVEL}",
        f"data.train_batch_size={PROMPTS_PER_STEP}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={MINI_BATCH}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO_BATCH}",
        f"actor_rollout_ref.actor.timestep_fraction={TIMESTEP_FRACTION}",
        f"actor_rollout_ref.actor.optim.lr={LR}",
        f"actor_rollout_ref.actor.clip_ratio={CLIP}",
        "actor_rollout_ref.actor.use_kl_loss=false",
        "actor_rollout_ref.actor.ema.enable=false",
        "algorithm.global_std=false",
        "reward.name=jpeg_compressibility",
    ]


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run_reference(args: argparse.Namespace, threads: int, model_dir: Path, tmp: Path, tag: str) -> Run:
    """One run of the reference trainer; its step seconds from the recorded epoch start times."""
    work = tmp / f"ref-{tag}"
    dataset = work / "dataset"
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / "train.txt").write_text((PROMPTS / "prompts.txt").read_text())
    (dataset / "test.txt").write_text((PROMPTS / "val_prompts.txt").read_text())
    out = work / "epochs.jsonl"
    out.unlink(missing_ok=True)
    settings = {
        "reference_dir": str(args.reference_dir),
        "work_dir": str(work),
        "steps": args.steps + 1,  # the first is not timed
        "threads": threads,
        "config": reference_config(model_dir, dataset, work / "logs"),
    }
    env = {
        **_thread_env(threads),
        "REF_BENCH_SETTINGS": json.dumps(settings),
        "REF_BENCH_OUT": str(out),
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("PYTHONPATH", None)
    log = work / "log.txt"
    load = os.getloadavg()[0]
    launched = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(args.reference_python), str(WRAPPER)],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin(set(range(threads))),
            timeout=args.timeout,
            check=False,
        )
    starts = [json.loads(line)["t"] for line in out.read_text().splitlines()] if out.exists() else []
    if proc.returncode != 0 or len(starts) < args.steps + 2:
        raise RuntimeError(f"reference run failed (exit {proc.returncode}); log {log}:\n{_tail(log)}")
    durations = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return Run("reference", threads, durations[1:], starts[0] - launched, load)


def run_ours(args: argparse.Namespace, mode: str, threads: int, model_dir: Path, tmp: Path, tag: str) -> Run:
    """One run of our recipe; step seconds and start-up from its metrics file."""
    run_dir = tmp / f"{mode}-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = our_overrides(mode, threads, args.steps, model_dir, run_dir)
    command = [sys.executable, "-m", "recipes.flowgrpo.main", *overrides]
    log = tmp / f"{mode}-{tag}.log"
    load = os.getloadavg()[0]
    with open(log, "w") as f:
        proc = subprocess.run(
            command,
            cwd=REPO,
            env=_thread_env(threads),
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=_pin(set(range(threads))),
            timeout=args.timeout,
            check=False,
        )
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        raise RuntimeError(f"recipe run failed (exit {proc.returncode}); log {log}:\n{_tail(log)}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r.get("data", r) for r in rows]
    step_s = [r["timing_s/step"] for r in rows if "timing_s/step" in r]
    startup = next(r["timing_s/startup/total"] for r in rows if "timing_s/startup/total" in r)
    return Run(mode, threads, step_s[1:], startup, load)


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def report(results: Results, threads: list[int], steps: int, rounds: int) -> str:
    """The table: per (threads, trainer) step seconds and start-up, with ratios against the reference."""
    layout = {
        "reference": lambda t: f"1 process x {t} thread{'s' * (t > 1)}",
        "sync": lambda t: f"{t} replica{'s' * (t > 1)} x 1 thread, then trainer 1 thread",
        "one_step_off": lambda t: "1 replica x 1 thread beside trainer 1 thread",
    }
    lines = [
        f"{steps} timed steps per run (the first step excluded; one_step_off: the last too), {rounds} round(s); "
        f"s/step: median of the runs' medians [range of the runs' medians]; start-up: process start to the first "
        f"step, median [range]",
        "",
        "| cores | trainer | threads | s/step | ours/ref | start-up s | ours/ref |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t in threads:
        ref = results.runs.get((t, "reference"), [])
        ref_step = statistics.median(statistics.median(steady(r)) for r in ref) if ref else None
        ref_start = statistics.median(r.startup_s for r in ref) if ref else None
        for trainer in TRAINERS:
            runs = results.runs.get((t, trainer), [])
            if not runs:
                continue
            medians = [statistics.median(steady(r)) for r in runs]
            starts = [r.startup_s for r in runs]
            name = "reference (flow_grpo)" if trainer == "reference" else f"ours, {trainer}"
            step_ratio = "1" if trainer == "reference" else _ratio(statistics.median(medians), ref_step)
            start_ratio = "1" if trainer == "reference" else _ratio(statistics.median(starts), ref_start)
            lines.append(
                f"| {t} | {name} | {layout[trainer](t)} | {_median_range(medians)} | {step_ratio} | "
                f"{_median_range(starts)} | {start_ratio} |"
            )
    loads = [r.load for runs in results.runs.values() for r in runs]
    if loads:
        lines.append(f"\n1-minute load average at the runs' starts: {min(loads):.1f}-{max(loads):.1f}")
    return "\n".join(lines)


def _ratio(ours: float, ref: float | None) -> str:
    return "-" if ref is None else f"{ours / ref:.2f}x"


def _tiny_model_dir() -> Path:
    from verl_omni.models.tiny_models import ensure_tiny_model

    cache = Path(os.environ.get("VERL_OMNI_CACHE", Path.home() / ".cache" / "verl_omni")) / "tiny_sd3"
    return ensure_tiny_model("sd3", cache)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-dir", type=Path, required=True, help="a checkout of yifan123/flow_grpo")
    parser.add_argument(
        "--reference-python", type=Path, default=Path("/tmp/venv-ref/bin/python"), help="python with its deps"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the recipe's cached tiny SD3")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (one more is run first)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="runs of each trainer, interleaved")
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json-out", type=Path, default=None, help="write every run's measurements here (per run)")
    parser.add_argument("--from-json", type=Path, default=None, help="print a --json-out file's table only")
    parser.add_argument("--keep-dir", type=Path, default=None, help="keep the runs' logs and outputs here")
    args = parser.parse_args(argv)
    if args.from_json:
        results = Results()
        for row in json.loads(args.from_json.read_text()):
            results.add(Run(**row))
        threads = sorted({t for t, _ in results.runs})
        rounds = max(len(runs) for runs in results.runs.values())
        print(report(results, threads, len(next(iter(results.runs.values()))[0].step_s), rounds))
        return
    if not (args.reference_dir / "scripts" / "train_sd3.py").is_file():
        parser.error(f"--reference-dir {args.reference_dir}: no scripts/train_sd3.py")
    cores = len(os.sched_getaffinity(0))
    if max(args.threads) > cores:
        parser.error(f"--threads {max(args.threads)} > the {cores} cores this process may use")
    model_dir = (args.model_dir or _tiny_model_dir()).resolve()
    print(f"model {model_dir}; {platform.processor() or platform.machine()}, {cores} cores; {time.ctime()}")
    results = Results()
    with tempfile.TemporaryDirectory(prefix="reference_trainer_bench_") as tmp_name:
        tmp = Path(tmp_name)
        if args.keep_dir:
            tmp = args.keep_dir.resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        for rnd in range(args.rounds):
            for t in args.threads:
                # rotate the order each round, so no trainer always runs first after a switch of thread count
                order = args.trainers[rnd % len(args.trainers) :] + args.trainers[: rnd % len(args.trainers)]
                for trainer in order:
                    tag = f"t{t}-r{rnd}"
                    if trainer == "reference":
                        run = run_reference(args, t, model_dir, tmp, tag)
                    else:
                        run = run_ours(args, trainer, t, model_dir, tmp, tag)
                    results.add(run)
                    print(
                        f"round {rnd + 1} threads {t} {trainer:>12}: "
                        f"s/step median {statistics.median(steady(run)):.3f} "
                        f"(steps {', '.join(f'{s:.2f}' for s in run.step_s)}), start-up {run.startup_s:.1f} s, "
                        f"load {run.load:.1f}",
                        flush=True,
                    )
                    if args.json_out:
                        rows = [r.__dict__ for runs in results.runs.values() for r in runs]
                        args.json_out.write_text(json.dumps(rows, indent=1) + "\n")
    print()
    print(report(results, args.threads, args.steps, args.rounds))


if __name__ == "__main__":
    main()
