"""Integration fixtures: the tiny diffusers model on disk."""

from __future__ import annotations

import pytest
from session_dir import built_once, session_dir


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The tiny SD3-architecture pipeline, built locally once per test session (nothing downloaded)."""
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    with built_once(session_dir(tmp_path_factory) / "models") as models:
        return str(ensure_tiny_sd3(models / "tiny_sd3"))
