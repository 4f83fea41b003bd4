"""Real-engine tests of the ``vllm_omni`` rollout backend: vllm-omni 0.28 on vLLM's CPU build, with the tiny SD3
model built locally. They need the ``vllm-omni-cpu`` extra, which `make test` does not install (tests/conftest.py
leaves this folder out where vllm-omni is not installed): `make test-vllm-omni` builds .venv-vllm-omni and runs them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """The tiny random SD3-architecture pipeline in the diffusers format (built locally, nothing downloaded)."""
    from verl_omni.models.tiny_sd3 import ensure_tiny_sd3

    return ensure_tiny_sd3(tmp_path_factory.mktemp("models"), seed=0)
