"""The start-up breakdown: phases against the process's start, their metrics and the one line the recipe prints."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from verl_omni.utils.startup import METRIC_PREFIX, StartupClock

REPO = Path(__file__).resolve().parents[1]


def test_default_origin_is_this_process_start() -> None:
    clock = StartupClock()
    assert 0 < clock.process_start <= time.time()
    assert clock.now() >= 0


def test_phases_become_metrics_and_one_line_in_start_order() -> None:
    clock = StartupClock()
    with clock.phase("ray"):
        pass
    done = threading.Event()

    def training() -> None:  # phases may run in other threads, beside each other
        with clock.phase("training_ranks"):
            done.wait(5)

    thread = threading.Thread(target=training)
    thread.start()
    with clock.phase("replicas"):
        pass
    done.set()
    thread.join()

    metrics = clock.metrics(first_step_at=12.5)
    assert set(metrics) == {f"{METRIC_PREFIX}{name}" for name in ("ray", "training_ranks", "replicas", "total")}
    assert metrics[f"{METRIC_PREFIX}total"] == 12.5
    assert all(value >= 0 for value in metrics.values())
    line = clock.line(first_step_at=12.5)
    assert line.startswith("start-up to the first step 12.5 s: ray ")
    assert line.index("ray") < line.index("training_ranks") < line.index("replicas")  # by start
    start, end = clock.phases["training_ranks"]
    assert f"training_ranks {end - start:.1f} s ({start:.1f}-{end:.1f})" in line


def test_a_phase_that_fails_is_still_recorded() -> None:
    clock = StartupClock(process_start=time.time())
    with pytest.raises(RuntimeError), clock.phase("replicas"):
        raise RuntimeError("a replica died at start-up")
    assert "replicas" in clock.phases


def test_the_driver_imports_what_it_uses_beside_rays_start() -> None:
    """What ``launch`` imports on its main thread once the import thread is done (and ``_start_training_ranks`` in
    its own) must already be loaded by ``_import_driver_modules``, which runs beside Ray's start: a package's lazy
    export named there instead of its module left verl's agent loop (0.7 s) to load on the main thread afterwards.
    A fresh interpreter, as a run starts."""
    code = """
import sys
from recipes.flowgrpo.main import _import_driver_modules
_import_driver_modules()
before = set(sys.modules)
from recipes.flowgrpo.data import PromptBatcher, ValidationBatches
from verl_omni.agent_loop import OmniAgentLoopManager
from verl_omni.trainer.flowgrpo.trainer import FlowGRPOTrainer
from verl_omni.utils.heartbeat import Heartbeat, ray_free_resources
from verl_omni.workers.rollout.omni_llm_server import OmniLLMServerManager
from verl.single_controller.ray import RayResourcePool
from verl_omni.workers.diffusion_actor import actor_worker_group
print(sorted(set(sys.modules) - before))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-3000:]
