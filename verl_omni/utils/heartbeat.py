"""A progress line while a long phase runs, so a run is never silent for minutes.

The trainer prints one line per step, and its progress bar is off when the output is not a terminal (a log file,
a CI job). On a loaded CPU machine one step of the SD3.5 settings takes minutes, and a Ray placement that cannot
be satisfied waits forever; both looked the same from outside: nothing printed. :class:`Heartbeat` runs the phase
as usual and, from a daemon thread, writes ``<phase>: still running after <s> s`` every ``interval_s`` seconds
until the phase ends, with an optional detail (Ray's free resources during start-up: a wait for resources that
never come shows as free CPUs or GPUs short of the request).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Heartbeat:
    """Writes a progress line every ``interval_s`` seconds while a :meth:`phase` block runs; 0 turns it off."""

    def __init__(self, interval_s: float, write: Callable[[str], None] = print):
        if not interval_s >= 0:
            raise ValueError(f"interval_s={interval_s!r} must be >= 0 (0 = no progress lines)")
        self.interval_s = float(interval_s)
        self.write = write
        self.current: str | None = None  # the phase running now (read by tools that act at a phase: make chaos)

    @contextmanager
    def phase(self, what: str, detail: Callable[[], str] | None = None) -> Iterator[None]:
        """Run the block; while it runs longer than the interval, say so (with ``detail()`` when given)."""
        self.current = what
        try:
            with self._beats(what, detail):
                yield
        finally:
            self.current = None

    @contextmanager
    def _beats(self, what: str, detail: Callable[[], str] | None) -> Iterator[None]:
        if self.interval_s == 0:
            yield
            return
        done = threading.Event()
        start = time.monotonic()

        def beat() -> None:
            while not done.wait(self.interval_s):
                line = f"{what}: still running after {time.monotonic() - start:.0f} s"
                if detail is not None:
                    try:
                        line += f" ({detail()})"
                    except Exception as err:  # a detail must never break the run it reports on
                        line += f" (detail unavailable: {err})"
                self.write(line)

        thread = threading.Thread(target=beat, name="verl-omni-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def ray_free_resources() -> str:
    """Ray's free CPUs and GPUs now, for start-up phases (a placement that waits shows what is missing)."""
    import ray

    free = ray.available_resources()
    total = ray.cluster_resources()
    return (
        f"Ray free: {free.get('CPU', 0):g}/{total.get('CPU', 0):g} CPUs, {free.get('GPU', 0):g}/{total.get('GPU', 0):g}"
        " GPUs; an actor that waits for more than is free never starts"
    )
