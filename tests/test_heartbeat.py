"""Progress lines while a long phase runs: written until the phase ends, with the caller's detail; none when off.

No timing is asserted: the phase blocks until the heartbeat has written, whatever the machine's speed.
"""

from __future__ import annotations

import threading

import pytest

from verl_omni.utils.heartbeat import Heartbeat


def test_a_phase_that_outlasts_the_interval_is_reported_with_its_detail():
    lines: list[str] = []
    written = threading.Event()

    def write(line: str) -> None:
        lines.append(line)
        written.set()

    with Heartbeat(0.01, write=write).phase("step 1: policy update on 64 samples", lambda: "Ray free: 2/4 CPUs"):
        assert written.wait(timeout=60)
    count = len(lines)
    assert lines[0].startswith("step 1: policy update on 64 samples: still running after ")
    assert lines[0].endswith(" s (Ray free: 2/4 CPUs)")
    assert not any(t.name == "verl-omni-heartbeat" for t in threading.enumerate())  # stopped with the phase
    assert len(lines) == count


def test_a_failing_detail_does_not_break_the_phase():
    written = threading.Event()
    lines: list[str] = []

    def broken() -> str:
        raise RuntimeError("ray not initialised")

    def write(line: str) -> None:
        lines.append(line)
        written.set()

    with Heartbeat(0.01, write=write).phase("start-up", broken):
        assert written.wait(timeout=60)
    assert "detail unavailable: ray not initialised" in lines[0]


def test_interval_zero_writes_nothing_and_errors_pass_through():
    with pytest.raises(KeyError), Heartbeat(0, write=pytest.fail).phase("off"):
        raise KeyError("the phase's own error")
    with pytest.raises(ValueError, match="interval_s=-1"):
        Heartbeat(-1)


@pytest.mark.parametrize("interval_s", [0, 60])
def test_the_running_phase_is_readable_while_it_runs(interval_s):
    beat = Heartbeat(interval_s, write=lambda line: None)
    assert beat.current is None
    with pytest.raises(KeyError), beat.phase("step 3: weight sync"):
        assert beat.current == "step 3: weight sync"
        raise KeyError("ends the phase")
    assert beat.current is None
