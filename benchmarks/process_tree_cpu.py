"""CPU-seconds of a run's whole process tree (the driver, the local Ray it starts, Ray's workers and actors), sampled
while it runs: on a machine with few cores the CPU work, not the wall time, says what a schedule can reach."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import psutil


def process_role(proc: psutil.Process, driver_pid: int) -> str:
    """``driver``, ``ray::<Actor>`` as Ray titles an actor's process, or Ray's own process by its program name."""
    if proc.pid == driver_pid:
        return "driver"
    cmdline = proc.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    for arg in cmdline[:3]:
        name = Path(arg).name
        if name.endswith(".py") or name in ("gcs_server", "raylet"):
            return f"ray {name}"
    return proc.name()


class ProcessTreeCPU:
    """Samples the user + system CPU-seconds of ``pid`` and every descendant; a process that exits keeps its last
    sample (call :meth:`sample` often: what it used after that sample is not seen)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._parent = psutil.Process(pid)
        self._last: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU-s at its last sample)

    def sample(self) -> float:
        """Sample every live process of the tree; returns the tree's CPU-seconds so far."""
        try:
            tree = [self._parent, *self._parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    role = process_role(proc, self.pid)
                previous = self._last.get(proc.pid)
                if previous and previous[0].startswith("ray::") and not role.startswith("ray::"):
                    role = previous[0]  # an exiting process has no command line: keep its title
                self._last[proc.pid] = (role, times.user + times.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended between listing and reading: its last sample stands
        return self.total()

    def total(self) -> float:
        return sum(cpu for _, cpu in self._last.values())

    def by_role(self) -> dict[str, list[float]]:
        """CPU-seconds per role, one entry per process."""
        roles: dict[str, list[float]] = defaultdict(list)
        for role, cpu in self._last.values():
            roles[role].append(cpu)
        return roles
