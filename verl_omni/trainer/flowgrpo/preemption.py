"""Preemption: clusters stop a job with SIGTERM and a grace period (Ctrl-C sends SIGINT).

The first signal lets the step in flight finish; the trainer then writes a checkpoint and stops, so the same
command resumes where the run stopped. A second signal, or the grace period running out, abandons the step:
the newest complete checkpoint stays as it was (checkpoints are written atomically).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Signal handlers for the training loop: ``requested`` names the first signal; ``expired`` says the grace
    period ran out (the step was abandoned by the run, not by a second signal from the user)."""

    def __init__(self, grace_s: float, write: Callable[[str], Any] = print) -> None:
        self.grace_s = grace_s
        self.requested: str | None = None
        self.expired = False
        self._write = write
        self._timer: threading.Timer | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # a second signal, or the grace period's own: abandon the step now
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        self._write(
            f"{self.requested} received: finishing the step in flight, then a checkpoint and exit (at most "
            f"trainer.preempt_grace_s={self.grace_s:g} s; a second signal stops at once)"
        )
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        """Out of grace: interrupt the main thread as a second signal would."""
        self.expired = True
        os.kill(os.getpid(), signal.SIGINT)
