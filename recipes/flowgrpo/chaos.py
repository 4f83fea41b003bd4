"""Chaos run: SIGKILL a rollout replica, the load balancer and an agent-loop worker during a FlowGRPO run.

    python -m recipes.flowgrpo.chaos [--steps 12] [--kill-at 3 6 9] [recipe overrides]     (or: make chaos)

Runs the recipe in this process (the tiny CPU default unless overridden) with its output in
``outputs/chaos/<time>``. A watcher thread follows ``metrics.jsonl``; after the given steps it waits for the
next rollout to be in flight and kills one process of each kind with SIGKILL (as the kernel's OOM killer
would), in the order replica, balancer, agent-loop worker. The run must finish every step: the replica's
copies are resent and it leaves weight sync, the balancer and the worker are restarted by Ray (the worker's
rollout chunk is re-run). Exit 0 when every kill happened and every step completed, else 1.

Kills by process id, so the actors must run on this machine (a local Ray, as the default recipe starts).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

VICTIMS = ("DiffusersRolloutServer", "OmniRequestLoadBalancer", "DiffusionAgentLoopWorker")


@dataclass
class Watcher:
    """Kills ``VICTIMS[i]`` once ``metrics.jsonl`` has ``kill_at[i]`` steps and a rollout is in flight."""

    metrics_file: Path
    kill_at: list[int]
    kills: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def steps_logged(self) -> int:
        try:
            return sum(1 for line in self.metrics_file.read_text().splitlines() if line.strip())
        except OSError:
            return 0

    def run(self) -> None:
        for victim, step in zip(VICTIMS, self.kill_at, strict=True):
            while self.steps_logged() < step:
                if self.stop.wait(0.2):
                    return
            time.sleep(0.5)  # into the next step's rollout (a CPU step of the tiny recipe takes a few seconds)
            pids = actor_pids(victim)
            if not pids:
                print(f"[chaos] no live {victim} to kill", flush=True)
                continue
            pid = pids[0]
            os.kill(pid, signal.SIGKILL)
            self.kills.append(victim)
            print(f"[chaos] after step {step}: SIGKILL {victim} (pid {pid})", flush=True)


def _parent(pid: int) -> int:
    try:  # field 4 of /proc/<pid>/stat, after the parenthesised command name
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def actor_pids(class_name: str) -> list[int]:
    """This run's processes of Ray actors of ``class_name``: Ray titles an actor's process ``ray::<Class>``, and
    the local Ray this process started is its descendant (another Ray session on the machine is left alone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.split(".")[0].split(" ")[0] == f"ray::{class_name}" and _descends_from(int(entry.name), os.getpid()):
            pids.append(int(entry.name))
    return sorted(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps of the run")
    parser.add_argument("--kill-at", type=int, nargs=3, default=[3, 6, 9], help="steps after which to kill each")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the recipe config")
    args = parser.parse_args(argv)
    if sorted(args.kill_at) != args.kill_at or args.kill_at[-1] >= args.steps:
        parser.error(f"--kill-at {args.kill_at} must be increasing and below --steps {args.steps}")

    from recipes.flowgrpo.config_compose import compose_recipe
    from recipes.flowgrpo.main import run

    run_dir = Path("outputs") / "chaos" / time.strftime("%Y%m%d-%H%M%S")
    cfg = compose_recipe(
        f"trainer.total_training_steps={args.steps}",
        f"trainer.default_local_dir={run_dir}",
        f"trainer.test_freq={args.steps}",
        f"trainer.save_freq={args.steps}",
        *args.overrides,
    )
    watcher = Watcher(run_dir / "metrics.jsonl", args.kill_at)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    try:
        history = run(cfg)
    finally:
        watcher.stop.set()
    lines = [json.loads(line)["data"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resent = sum(int(m.get("rollout_routing/requests_resent", 0)) for m in lines)
    lost = max((int(m.get("rollout/replicas_lost", 0)) for m in lines), default=0)
    ok = len(history) == args.steps and watcher.kills == list(VICTIMS)
    print(
        f"[chaos] {'OK' if ok else 'FAILED'}: {len(history)}/{args.steps} steps; killed {watcher.kills}; "
        f"replicas lost {lost}; requests resent {resent}; outputs in {run_dir}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
