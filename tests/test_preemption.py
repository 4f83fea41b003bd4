"""GracefulStop, the trainer's stop-signal handling, with real signals sent to this process (no Ray)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from verl_omni.trainer.flowgrpo.preemption import GracefulStop


def test_first_signal_is_a_request_and_handlers_are_restored() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    lines: list[str] = []
    with GracefulStop(grace_s=600, write=lines.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM" and not stop.expired
    assert "SIGTERM received: finishing the step in flight" in lines[0] and "preempt_grace_s=600" in lines[0]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_second_signal_abandons_the_step() -> None:
    with pytest.raises(KeyboardInterrupt), GracefulStop(grace_s=600, write=lambda _: None) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(600)  # a step still in flight: the second signal interrupts it
    assert stop.requested == "SIGINT" and not stop.expired


def test_grace_period_abandons_a_step_that_does_not_finish() -> None:
    with pytest.raises(KeyboardInterrupt), GracefulStop(grace_s=0.1, write=lambda _: None) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(600)  # never finishes on its own
    assert stop.requested == "SIGTERM" and stop.expired
