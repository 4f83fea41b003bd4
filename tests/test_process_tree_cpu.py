"""The benchmarks' process-tree CPU sampler: it counts the descendants a run starts, not just the run's own process."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.process_tree_cpu import ProcessTreeCPU

# A child that starts a busy grandchild and outlives it: the grandchild's CPU must be counted from its last sample.
_CHILD = (
    "import subprocess, sys, time\n"
    "busy = 'x = 0\\nfor i in range(4 * 10**6):\\n    x += i\\n'\n"
    "subprocess.run([sys.executable, '-c', busy], check=True)\n"
    "time.sleep(0.3)\n"
)


def test_the_tree_counts_an_exited_grandchild_and_names_the_driver() -> None:
    child = subprocess.Popen([sys.executable, "-c", _CHILD])
    tree = ProcessTreeCPU(child.pid)
    while child.poll() is None:
        tree.sample()
        time.sleep(0.02)
    roles = tree.by_role()
    assert set(roles) >= {"driver"}, roles
    others = [cpu for role, cpus in roles.items() if role != "driver" for cpu in cpus]
    assert len(others) >= 1 and max(others) > 0.05, roles  # the busy loop, seen before it exited
    assert tree.total() == sum(cpu for cpus in roles.values() for cpu in cpus)
