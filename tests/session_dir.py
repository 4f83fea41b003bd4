"""The directory one test session's pytest-xdist workers share, for what the session builds once (tiny models)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from filelock import FileLock


def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Under ``make test`` (two xdist workers) each worker's temporary directory is its own, under one root per
    session: that root. Without xdist, the session's own temporary directory."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def built_once(path: Path) -> Iterator[Path]:
    """``path``, held under a file lock beside it: the first worker builds there, the others wait, then reuse it."""
    with FileLock(f"{path}.lock"):
        yield path
