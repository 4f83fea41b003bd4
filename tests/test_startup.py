"""The start-up breakdown: phases against the process's start, their metrics and the one line the recipe prints."""

from __future__ import annotations

import threading
import time

import pytest

from verl_omni.utils.startup import METRIC_PREFIX, StartupClock


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
