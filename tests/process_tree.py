"""This machine's process tree, read from /proc: for tests that kill a Ray actor's process as the OOM killer would."""

from __future__ import annotations

import os
from pathlib import Path


def _parent(pid: int) -> int:
    try:  # field 4 of /proc/<pid>/stat, after the parenthesised command name
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        pid = _parent(pid)
        if pid == ancestor:
            return True
    return False


def actor_pids(class_name: str) -> list[int]:
    """This run's processes of Ray actors of ``class_name``: Ray titles an actor's process ``ray::<Class>``, and
    the local Ray this process started is its descendant (another Ray session on the machine is left alone)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.split(".")[0].split(" ")[0] == f"ray::{class_name}" and descends_from(int(entry.name), os.getpid()):
            pids.append(int(entry.name))
    return sorted(pids)
