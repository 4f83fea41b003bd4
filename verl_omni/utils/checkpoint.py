"""Atomic checkpoints: a crash or Ctrl-C at any point leaves the previous checkpoint complete and findable.

Layout, compatible with verl's names::

    root_dir/
        global_step_{step}/                 one ``{name}.pt`` per state entry, extra files, ``checkpoint.json``
        latest_checkpointed_iteration.txt   the last completed step (verl's tracker file)

A checkpoint is written into a hidden temporary directory beside its final place and renamed into place only
once every file is flushed; the rename is the commit. The tracker is then replaced atomically. One process
(rank 0) writes a given ``root_dir``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "checkpoint.json"
STEP_DIR_PREFIX = "global_step_"
_TMP_PREFIX = ".tmp_"
_STEP_DIR_RE = re.compile(rf"^{STEP_DIR_PREFIX}(\d+)$")
_STATE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def step_dir(root_dir: str | os.PathLike, step: int) -> Path:
    """Final directory of the checkpoint of ``step``."""
    return Path(root_dir) / f"{STEP_DIR_PREFIX}{int(step)}"


def _fsync_path(path: Path) -> None:
    """Flush a file or directory entry to disk, so a rename never exposes a half-written file after power loss."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some filesystems cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_path(path.parent)


def _move_aside(path: Path) -> Path:
    """Rename a directory to a temporary name (ignored by readers), so deleting it never leaves half of it visible."""
    trash = path.with_name(f"{_TMP_PREFIX}trash_{path.name}.{uuid.uuid4().hex}")
    os.replace(path, trash)
    return trash


def _remove_stale_temporaries(root: Path) -> None:
    """Delete what crashed writes left behind (safe because one process writes a root_dir)."""
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def save_checkpoint(
    root_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    keep_last: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state`` (one ``torch.save`` file per top-level key) as ``global_step_{step}`` and mark it latest.

    ``write_extra(dir)`` may add files to the checkpoint before it is committed (e.g. a LoRA adapter's
    ``save_pretrained``). ``keep_last`` keeps only the newest ``k`` checkpoints. An existing checkpoint of the
    same step is replaced (a crash during that swap can lose that step, never an older one). Leftovers of earlier
    crashed writes are removed. Returns the checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    bad = [name for name in state if not isinstance(name, str) or not _STATE_NAME_RE.match(name)]
    if bad:
        raise ValueError(f"checkpoint state keys must be file-name safe ([A-Za-z0-9_.-]), got {bad}")

    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    final = step_dir(root, step)
    tmp = root / f"{_TMP_PREFIX}{final.name}.{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name, value in state.items():
            with (tmp / f"{name}.pt").open("wb") as f:
                torch.save(value, f)
                f.flush()
                os.fsync(f.fileno())
        if write_extra is not None:
            write_extra(tmp)
        manifest = {"step": step, "state_keys": sorted(state), "saved_at": time.time()}
        with (tmp / MANIFEST_FILE).open("w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        replaced = _move_aside(final) if final.exists() else None
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _fsync_path(root)
    _atomic_write_text(root / TRACKER_FILE, str(step))
    if keep_last is not None:
        for old_step, old_path in list_checkpoints(root)[:-keep_last]:
            if old_step != step:
                shutil.rmtree(_move_aside(old_path), ignore_errors=True)
    return final


def list_checkpoints(root_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root_dir`` as ``(step, path)``, oldest first; temporary dirs are ignored."""
    root = Path(root_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR_RE.match(entry.name)
        if match and entry.is_dir() and (entry / MANIFEST_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest_checkpoint(root_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The newest complete checkpoint as ``(step, path)``, or ``None`` when there is none.

    A directory counts only once its manifest exists, which happens before the rename that commits it, so a
    crash mid-write is invisible here. The newest complete directory wins even if the crash came between the
    rename and the tracker update.
    """
    checkpoints = list_checkpoints(root_dir)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", weights_only: bool = True
) -> dict:
    """Load the state dict saved by ``save_checkpoint`` from a ``global_step_*`` directory.

    ``weights_only=True`` (torch's safe loader) accepts tensors, numbers, strings and containers of them;
    pass ``False`` only for trusted checkpoints holding other Python objects.
    """
    directory = Path(path)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{str(directory)!r} is not a complete checkpoint: {MANIFEST_FILE} is missing")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return {
        name: torch.load(directory / f"{name}.pt", map_location=map_location, weights_only=weights_only)
        for name in manifest["state_keys"]
    }
