"""Shared fixtures: a local CPU-only Ray, started once and shared by the test modules that ask for it; the tiny
pretrained model, built once."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from session_dir import built_once, session_dir


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
# Token auth off for every Ray the tests start or join (all local, for one session; recipe_ray's too): one mode for
# all of them, as Ray reads it once per process, when its core library loads. Otherwise the first ray.init here
# turns token auth on for this process's environment, and the runs it starts (and the warm driver, tests/
# warm_recipe.py) would see another mode than the cluster they join.
os.environ["RAY_AUTH_MODE"] = "disabled"


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
    (about 25 s on two cores) and shared by the tests that need it, as a user's cache is shared by their runs. One
    build for all xdist workers: the first builds it under a lock, the others wait and reuse it."""
    from verl_omni.models.tiny_pretrain import ensure_pretrained_tiny_sd3

    with built_once(session_dir(tmp_path_factory) / "verl_omni_cache") as cache:
        ensure_pretrained_tiny_sd3(cache / "tiny_sd3", seed=0, progress=False)  # where recipes.flowgrpo.main looks
    return cache


@pytest.fixture(scope="session")
def recipe_ray() -> Iterator[dict[str, str]]:
    """One Ray cluster (``ray start --head``) that the recipe's subprocess runs join through ``RAY_ADDRESS``, as a
    user joins a running cluster: a run then skips starting a Ray of its own (GCS, raylet, agents and prestarted
    workers: about 15 CPU-seconds each time). Returns the environment variables a run needs. Its 4 CPUs are the
    tiny config's ``ray_init.num_cpus``, which a joining run drops with a note. Token auth is off: the cluster
    listens on 127.0.0.1 only and lives for this session."""
    temp = Path(tempfile.mkdtemp(prefix="vo-ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    log = temp / "head.log"
    cmd = [ray_cli, "start", "--head", "--block", "--port=0", "--node-ip-address=127.0.0.1", "--num-cpus=4"]
    cmd += ["--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    with log.open("w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, address = time.monotonic() + 120, None
        while address is None:
            found = re.search(r"--address='([^']+)'", log.read_text())
            address = found and found.group(1)
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head failed: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(verl_omni_cache):
    """``tiny_model(name)``: the path of tiny model ``name`` (``actor_rollout_ref.model.tiny``: sd3, flux,
    qwen_image, wan) in the session's cache, built on its first request (Wan: about 12 s) and then shared by every
    test and every recipe run with ``VERL_OMNI_CACHE`` set to ``verl_omni_cache``, where the recipe looks for it."""
    from recipes.flowgrpo.main import TINY_MODEL_CACHE
    from verl_omni.models.tiny_models import ensure_tiny_model

    cache = verl_omni_cache / TINY_MODEL_CACHE.name

    def get(name: str) -> str:
        with built_once(cache / name):  # one build for all xdist workers (a lock named for the model)
            return str(ensure_tiny_model(name, cache))

    return get
