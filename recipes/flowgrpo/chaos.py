"""Chaos runs: SIGKILL rollout processes at times drawn from a seed during FlowGRPO runs, and check each run.

    python -m recipes.flowgrpo.chaos [--seeds 0 1 2] [--steps 6] [--faults 3] [recipe overrides]   (or: make chaos)

First an undisturbed run of the recipe (the tiny CPU default at 2 prompts x 4 samples a step, unless overridden),
then one run per seed, each in a process of its own (its own local Ray), outputs under
``outputs/chaos/<time>/{reference,seed-<s>}``. A seed draws ``--faults`` faults, each a target, a step and a delay:

- ``replica``, ``balancer``, ``worker``: a rollout replica, the load balancer, an agent-loop worker, killed the
  drawn delay after the step's rollout started (a delay up to most of the undisturbed run's rollout time);
- ``replica_in_sync``: a rollout replica, killed while the driver pushes the step's new weights.

A watcher thread in the run's process follows the trainer's phase (``Heartbeat.current``) and kills the target's
process with SIGKILL, as the kernel's OOM killer would. Without replacement replicas (a trainer with no
``rollout_replicas`` pool) at most replicas - 1 replica faults are drawn, so one replica always serves.

Every seed's run must (exit 1 otherwise, with what failed):

- complete every step, with every fault delivered;
- have no short group: each step the reference's number of groups, each of its full size;
- log every step's training reward equal to the undisturbed run's (a resent copy keeps its seed, a re-run chunk
  its rows, so the samples are the same);
- leave the newest complete checkpoint loadable after every fault (checked once the fault's step is logged and
  the checkpoint due at its end written).

Kills by process id, so the actors must run on this machine (a local Ray, as the default recipe starts).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TARGETS = ("replica", "balancer", "worker", "replica_in_sync")
RUN_OVERRIDES = [  # a checkpoint every 2 steps (all kept), so each fault has one to check; no validation rollouts
    "data.train_batch_size=2",  # 2 prompts x 4 samples a step: the faults, not the model, are under test
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=8",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "trainer.save_freq=2",
    "trainer.max_actor_ckpt_to_keep=null",
    "trainer.test_freq=-1",
    "trainer.val_before_train=false",
]
RESULT_FILE = "chaos.json"


@dataclass
class Fault:
    """One kill: ``target`` (one of ``TARGETS``) ``delay_s`` into the rollout, or the weight sync, of ``step``."""

    target: str
    step: int  # 0-based, as the trainer counts; its phases are named "step {step + 1}: ..."
    delay_s: float
    pick: float = 0.0  # which replica or worker: this fraction of the way along the live ones
    killed: str = ""  # what was killed (name and pid), once it was
    phase: str | None = None  # the trainer's phase when the signal was sent
    checkpoint: str = ""  # the newest complete checkpoint loaded after the fault's step, once it was


def draw_faults(
    seed: int, steps: int, faults: int, rollout_s: float, sync_s: float, max_replica_faults: int
) -> list[Fault]:
    """``faults`` faults at distinct steps in 1..steps-2 (never the first, whose start-up has no reference time,
    nor the last, so a step follows each), targets and delays from ``seed``; at most ``max_replica_faults``
    of them kill a replica."""
    rng = random.Random(seed)
    if faults > steps - 2:
        raise ValueError(f"--faults {faults} needs at least {faults + 2} --steps (got {steps})")
    picked = sorted(rng.sample(range(1, steps - 1), faults))
    out, replica_faults = [], 0
    for step in picked:
        choices = [t for t in TARGETS if "replica" not in t or replica_faults < max_replica_faults]
        target = rng.choice(choices)
        replica_faults += "replica" in target
        span = sync_s if target == "replica_in_sync" else rollout_s
        out.append(Fault(target, step, round(rng.uniform(0.0, 0.8 * span), 3), pick=rng.random()))
    return out


@dataclass
class Watcher:
    """Delivers ``faults`` in order to the run ``trainer`` drives, then checks the newest checkpoint after each."""

    trainer: Any
    faults: list[Fault]
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            for fault in self.faults:
                if not self._deliver(fault):
                    return
                # the fault's step is logged and the checkpoint due at its end (if any) written: the next fault
                # may come in the very next step, so no later than that
                if not self._wait(lambda f=fault: self._saved_after(f.step)):
                    return
                fault.checkpoint = self._check_checkpoint()
        except Exception as err:  # reported by the run's checks, never a silent end of the thread
            self.errors.append(f"watcher: {type(err).__name__}: {err}")

    def _wait(self, condition: Any, poll_s: float = 0.001) -> bool:
        """Whether ``condition`` came true before the run ended."""
        while not condition():
            if self.stop.wait(poll_s):
                return bool(condition())
        return True

    def _saved_after(self, step: int) -> bool:
        """Whether ``step`` is logged and the checkpoint ``trainer.save_freq`` asks for by its end is complete."""
        from verl_omni.utils.checkpoint import find_latest_checkpoint

        done = step + 1
        if len(self.trainer.history) < done:
            return False
        freq = int(self.trainer.config.trainer.get("save_freq", -1) or -1)
        due = done // freq * freq if freq > 0 else 0
        found = find_latest_checkpoint(self.trainer.ckpt_dir)
        return due == 0 or (found is not None and found[0] >= due)

    def _deliver(self, fault: Fault) -> bool:
        phase = "weight sync" if fault.target == "replica_in_sync" else "rollout"
        name, pid = self._victim(fault)  # before the phase: asking an actor takes a moment
        prefix = f"step {fault.step + 1}: {phase}"
        if not self._wait(lambda: (self.trainer.heartbeat.current or "").startswith(prefix)):
            return False
        time.sleep(fault.delay_s)
        fault.phase = self.trainer.heartbeat.current
        os.kill(pid, signal.SIGKILL)
        fault.killed = f"{name} (pid {pid})"
        print(f"[chaos] step {fault.step + 1}, {fault.delay_s:.3f} s into {phase}: SIGKILL {fault.killed}", flush=True)
        return True

    def _victim(self, fault: Fault) -> tuple[str, int]:
        """The target's name and process id (asked of the actor itself: a restarted one has a new process)."""
        import ray

        manager = self.trainer.agent_loop_manager
        if fault.target == "balancer":
            handle, name = manager.llm_client._load_balancer, "load balancer"
        elif fault.target == "worker":
            workers = manager.agent_loop_workers
            index = int(fault.pick * len(workers))
            handle, name = workers[index], f"agent-loop worker {index}"
        else:
            replicas = list(self.trainer.replicas)
            replica = replicas[int(fault.pick * len(replicas))]
            handle, name = replica.servers[0], f"replica {replica.server_address}"
        return name, int(ray.get(handle.__ray_call__.remote(lambda actor: os.getpid())))

    def _check_checkpoint(self) -> str:
        from verl_omni.utils.checkpoint import find_latest_checkpoint, load_checkpoint

        found = find_latest_checkpoint(self.trainer.ckpt_dir)
        if found is None:
            return "none yet"
        step, path = found
        state = load_checkpoint(path, weights_only=False)
        if int(state["trainer"]["step"]) != step or not state["actor"]:
            raise RuntimeError(f"checkpoint {path} holds step {state['trainer']['step']}, not {step}")
        return path.name


def run_one(run_dir: Path, faults: list[Fault], overrides: list[str]) -> int:
    """One run in this process (a child of :func:`main`), with ``faults`` delivered; writes ``chaos.json``."""
    from recipes.flowgrpo.config_compose import compose_recipe
    from recipes.flowgrpo.main import _close_replicas, launch

    cfg = compose_recipe(f"trainer.default_local_dir={run_dir}", *RUN_OVERRIDES, *overrides)
    trainer = launch(cfg)
    watcher = Watcher(trainer, faults)
    thread = threading.Thread(target=watcher.run, name="chaos-watcher", daemon=True)
    thread.start()
    try:
        history = trainer.fit()
    finally:
        watcher.stop.set()
        thread.join()
        _close_replicas(trainer)
    result = {"steps": len(history), "faults": [asdict(f) for f in faults], "errors": watcher.errors}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=1))
    return 0


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["data"] for line in lines if line.strip()]


def check_run(run_dir: Path, reference: list[dict[str, float]], steps: int) -> list[str]:
    """What is wrong with one chaos run, compared with the undisturbed ``reference`` metrics (empty: nothing)."""
    result = json.loads((run_dir / RESULT_FILE).read_text())
    problems = list(result["errors"])
    metrics = _metrics(run_dir)
    if result["steps"] != steps or len(metrics) != steps:
        problems.append(f"{result['steps']} of {steps} steps completed ({len(metrics)} logged)")
    problems += [f"fault not delivered: {f}" for f in result["faults"] if not f["killed"]]
    problems += [f"no checkpoint checked after {f}" for f in result["faults"] if f["killed"] and not f["checkpoint"]]
    for step, (got, want) in enumerate(zip(metrics, reference, strict=False)):
        for key in ("reward/num_groups", "reward/group_size_min", "reward/group_size_max"):
            if got.get(key) != want.get(key):
                problems.append(f"step {step + 1}: {key} {got.get(key)} != undisturbed {want.get(key)}")
        if got["reward/mean"] != want["reward/mean"]:
            problems.append(
                f"step {step + 1}: reward/mean {got['reward/mean']!r} != undisturbed {want['reward/mean']!r}"
            )
    return problems


def _child(run_dir: Path, faults: list[Fault], overrides: list[str]) -> int:
    """Run one recipe run in a process of its own; its exit status."""
    command = [sys.executable, "-m", "recipes.flowgrpo.chaos", "--child", str(run_dir)]
    command += ["--child-faults", json.dumps([asdict(f) for f in faults]), "--", *overrides]
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one chaos run per seed")
    parser.add_argument("--steps", type=int, default=6, help="training steps of each run")
    parser.add_argument("--faults", type=int, default=3, help="faults per run, at distinct steps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/chaos/<time>)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-faults", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe config")
    args = parser.parse_args(argv)
    if args.child is not None:
        return run_one(args.child, [Fault(**f) for f in json.loads(args.child_faults)], args.overrides)
    if args.faults < 1 or args.steps < args.faults + 2:
        parser.error(f"--faults {args.faults} must be >= 1 and --steps {args.steps} at least faults + 2")

    out = args.out or Path("outputs") / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"trainer.total_training_steps={args.steps}", *args.overrides]
    start = time.monotonic()
    if _child(out / "reference", [], overrides) != 0:
        print("[chaos] FAILED: the undisturbed run did not finish")
        return 1
    reference = _metrics(out / "reference")
    rollout_s = min(m["timing_s/rollout"] for m in reference[1:])
    sync_s = min(m["timing_s/weight_sync"] for m in reference[1:])
    replicas = _replica_count(out / "reference")
    failed = 0
    for seed in args.seeds:
        faults = draw_faults(seed, args.steps, args.faults, rollout_s, sync_s, max_replica_faults=replicas - 1)
        run_dir = out / f"seed-{seed}"
        status = _child(run_dir, faults, overrides)
        problems = check_run(run_dir, reference, args.steps) if (run_dir / RESULT_FILE).exists() else []
        if status != 0 and not problems:
            problems = [f"the run exited with status {status}"]
        drawn = ", ".join(f"{f.target}@{f.step + 1}+{f.delay_s:.2f}s" for f in faults)
        print(f"[chaos] seed {seed}: {'OK' if not problems else 'FAILED'} ({drawn})", flush=True)
        for problem in problems:
            print(f"[chaos]   {problem}")
        failed += bool(problems)
    print(
        f"[chaos] {len(args.seeds) - failed}/{len(args.seeds)} seeds OK, {args.steps} steps and {args.faults} faults "
        f"each, {time.monotonic() - start:.0f} s; outputs in {out}"
    )
    return 1 if failed else 0


def _replica_count(run_dir: Path) -> int:
    """The run's rollout replicas; unbounded when the trainer replaces dead ones (it logs replicas_replaced)."""
    from omegaconf import OmegaConf

    if "rollout/replicas_replaced" in _metrics(run_dir)[0]:
        return sys.maxsize

    rollout = OmegaConf.load(run_dir / "config.yaml").actor_rollout_ref.rollout
    per_replica = int(rollout.tensor_model_parallel_size) * int(rollout.get("data_parallel_size", 1) or 1)
    return int(rollout.n_gpus_per_node) * int(rollout.nnodes) // per_replica


if __name__ == "__main__":
    sys.exit(main())
