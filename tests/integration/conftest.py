"""Integration fixtures: the tiny diffusers model on disk."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """The tiny SD3-architecture pipeline, built locally once per test session (nothing downloaded)."""
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    return str(ensure_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny_sd3"))
