"""Shared fixtures: a local CPU-only Ray, started once and shared by the test modules that ask for it; the tiny
pretrained model, built once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from importlib import metadata

import pytest


def _installed(distribution: str) -> bool:
    """Whether a distribution is installed, from its metadata (a module lookup would find a folder of that name)."""
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


# The vllm_omni backend's real-engine tests need the vllm-omni-cpu extra: `make test-vllm-omni` runs them in its own
# environment (.venv-vllm-omni); `make test`'s environment does not have it.
collect_ignore = [] if _installed("vllm-omni") else ["vllm_omni_engine"]

# Keep Ray light on a 2-core machine: no dashboard, no usage stats, quiet logs.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


_RAY_LOCAL_INIT = {
    "address": "local",  # our own Ray, even beside a `ray start` or another test's cluster on this machine
    "num_cpus": 4,
    "num_gpus": 0,
    "include_dashboard": False,
    "log_to_driver": False,
    "configure_logging": False,
    "runtime_env": {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
}


@pytest.fixture(scope="session")
def _ray_session() -> Iterator[dict[str, str]]:
    """The shared local Ray's GCS address once started; shut down after the last test."""
    started: dict[str, str] = {}
    yield started
    if started:
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def ray_local(_ray_session: dict[str, str]):
    """A local Ray with explicit resources, one for every module that asks for it: a cluster's start (GCS, raylet,
    agents) costs seconds of CPU, which each module used to pay again. Started again when a module shut it down or
    connected this process to another cluster (the multi-node test does both)."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _ray_session.get("gcs_address"):
        ray.shutdown()
    if not ray.is_initialized():
        _ray_session["gcs_address"] = ray.init(**_RAY_LOCAL_INIT).address_info["gcs_address"]
    return ray


@pytest.fixture(scope="session")
def verl_omni_cache(tmp_path_factory):
    """A ``VERL_OMNI_CACHE`` directory holding the recipe's default pretrained tiny model, built once per session
    (about 25 s on two cores) and shared by the tests that need it, as a user's cache is shared by their runs."""
    from verl_omni.models.tiny_pretrain import ensure_pretrained_tiny_sd3

    cache = tmp_path_factory.mktemp("verl_omni_cache")
    ensure_pretrained_tiny_sd3(cache / "tiny_sd3", seed=0, progress=False)  # where recipes.flowgrpo.main looks
    return cache
