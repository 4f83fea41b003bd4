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


@pytest.fixture(scope="session")
def verl_omni_cache(tmp_path_factory) -> Path:
    """This folder's ``VERL_OMNI_CACHE``, empty until ``tiny_model(name)`` (tests/conftest.py) builds a model in it:
    tests/conftest.py's builds the pretrained tiny SD3 up front (about 40 s of CPU), which no test here uses."""
    return tmp_path_factory.mktemp("verl_omni_cache")
