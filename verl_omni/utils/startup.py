"""Where a run's start-up time goes: seconds per phase, from the process's start to the first training step.

Phases may overlap (the recipe starts the training ranks beside the replicas on one node), so they do not add up to
the total; the line says which ran at once by giving each phase's start and end.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

METRIC_PREFIX = "timing_s/startup/"


class StartupClock:
    """Records named phases against the process's start time (``psutil``: the interpreter's own start counts)."""

    def __init__(self, process_start: float | None = None):
        self.process_start = psutil.Process(os.getpid()).create_time() if process_start is None else process_start
        self.phases: dict[str, tuple[float, float]] = {}  # name -> (start, end), seconds since process_start

    def now(self) -> float:
        """Seconds since the process started."""
        return time.time() - self.process_start

    @contextmanager
    def phase(self, name: str, since: float | None = None) -> Iterator[None]:
        """Time the block as phase ``name`` (thread-safe: each phase has its own name); ``since``: the phase began
        earlier, at this :meth:`now` (work started before the block that waits for it)."""
        start = self.now() if since is None else since
        try:
            yield
        finally:
            self.phases[name] = (start, self.now())

    def metrics(self, first_step_at: float) -> dict[str, float]:
        """``timing_s/startup/<phase>`` durations and ``timing_s/startup/total`` (process start to first step)."""
        out = {f"{METRIC_PREFIX}{name}": end - start for name, (start, end) in self.phases.items()}
        out[f"{METRIC_PREFIX}total"] = first_step_at
        return out

    def line(self, first_step_at: float) -> str:
        """One line: the total, then each phase's seconds and its span since the process started."""
        spans = ", ".join(
            f"{name} {end - start:.1f} s ({start:.1f}-{end:.1f})"
            for name, (start, end) in sorted(self.phases.items(), key=lambda kv: kv[1])
        )
        return f"start-up to the first step {first_step_at:.1f} s: {spans}"
