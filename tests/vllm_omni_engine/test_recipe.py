"""The FlowGRPO recipe end to end with ``actor_rollout_ref.rollout.name=vllm_omni`` on CPU: two real vllm-omni
replicas behind ``prompt_uid_affinity`` routing, a LoRA adapter synced to them every step, and one replica killed
with SIGKILL mid-run and replaced. The run is a subprocess joining the session's Ray cluster, as a user runs it
against a running cluster. The model is the session's tiny random SD3 (test_engine.py's engine serves it too), not
the recipe's default pretrained one: the same classes (the pretrained one differs in weights only, its VAE
hand-set), without its pretraining (about 40 s of CPU); `make test`'s recipe runs train the default."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import warm_recipe
from process_tree import actor_pids, descends_from
from recipe_runs import NO_VALIDATION, SMALL_RUN

REPO = Path(__file__).resolve().parents[2]
STEPS = 5
KILL_AFTER = 2  # steps logged before the kill
OVERRIDES = [
    "actor_rollout_ref.rollout.name=vllm_omni",
    "server_routing.policy=prompt_uid_affinity",
    "actor_rollout_ref.model.lora_rank=8",
    f"trainer.total_training_steps={STEPS}",
    *SMALL_RUN,
    *NO_VALIDATION,
    "trainer.save_freq=-1",
]


def _steps(metrics: Path) -> list[dict]:
    try:
        return [json.loads(line)["data"] for line in metrics.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _engine_processes(servers: list[int]) -> list[int]:
    """The server actors and every process under them (vllm-omni's stage and worker processes)."""
    under = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return servers + [pid for pid in under if any(descends_from(pid, s) for s in servers)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_vllm_omni_replicas_train_lora_and_survive_a_killed_replica(tmp_path, tiny_sd3, verl_omni_cache, recipe_ray):
    run_dir = tmp_path / "run"
    env = {**os.environ, **recipe_ray, "VERL_OMNI_CACHE": str(verl_omni_cache), "PYTHONUNBUFFERED": "1"}
    args = [f"actor_rollout_ref.model.path={tiny_sd3}", f"trainer.default_local_dir={run_dir}", *OVERRIDES]
    proc = warm_recipe.start(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    killed: list[int] = []
    engine_pids: list[int] = []
    deadline = time.monotonic() + 1500
    while proc.poll() is None and time.monotonic() < deadline:
        if not killed and len(_steps(run_dir / "metrics.jsonl")) >= KILL_AFTER:
            time.sleep(0.3)  # into the next step's rollout
            pids = actor_pids("VllmOmniRolloutServer")
            assert len(pids) == 2, pids
            engine_pids = _engine_processes(pids)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    log = "".join(output)
    assert proc.returncode == 0, log[-6000:]
    assert killed, "the run ended before a replica could be killed"

    steps = _steps(run_dir / "metrics.jsonl")
    assert len(steps) == STEPS
    # No sample lost: every step trained on both full groups, before and after the kill.
    assert all(m["reward/num_groups"] == 2 and m["reward/group_size_min"] == 4 for m in steps)
    assert steps[-1]["rollout/replicas_lost"] == 1
    # the lost replica was replaced (a new vllm-omni engine, given the adapter before serving): both slots serve
    assert steps[-1]["rollout/replicas_replaced"] == 1 and steps[-1]["rollout/replicas_live"] == 2
    assert all(m["weight_sync/driver_bytes"] == 0 for m in steps)
    assert steps[-1]["rollout/model_version"] == STEPS - 1  # the LoRA adapter reached the survivor every step
    assert all(m["rollout_routing/colocation"] == 1.0 for m in steps)  # each group on one replica
    deviations = [m["actor/ratio_max_abs_dev"] for m in steps]
    print(f"vllm_omni recipe: actor/ratio_max_abs_dev per step {[f'{d:.2g}' for d in deviations]}")
    print(f"requests resent after the kill: {sum(m['rollout_routing/requests_resent'] for m in steps):.0f}")
    assert all(d < 1e-4 for d in deviations)  # float32 on both sides; not bit-exact (vLLM's CPU GEMM)
    time.sleep(3)  # a killed actor's engine processes notice their parent is gone
    assert not [pid for pid in engine_pids if _alive(pid)], "vllm-omni processes outlived the run"
