"""The rollout backends verl-omni registers (``actor_rollout_ref.rollout.name``) and whether this setup can run one.

Checked at config validation, before Ray starts, so a backend that cannot run here fails with one line naming
the key, the value and what to do, instead of inside a replica actor minutes later.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from verl_omni.pipelines.registry import adapter_path, check_backend_name

BACKEND_KEY = "actor_rollout_ref.rollout.name"
VLLM_OMNI_INSTALL = "pip install -e .[vllm-omni]"
_VLLM_OMNI_MODULES = ("vllm", "vllm_omni")


def missing_vllm_omni_modules() -> list[str]:
    """The vllm-omni extra's top-level modules that are not installed (found without importing them)."""
    return [name for name in _VLLM_OMNI_MODULES if importlib.util.find_spec(name) is None]


def check_rollout_backend(name: object, model_path: str | None = None, available_gpus: int | None = None) -> None:
    """Raise ``ValueError`` unless backend ``name`` exists, is installed, has the GPUs it needs and can serve the
    model at ``model_path`` (None: the built-in tiny SD3 model, which every backend serves).

    ``available_gpus`` defaults to this machine's CUDA device count.
    """
    check_backend_name(name)
    if name == "vllm_omni":
        missing = missing_vllm_omni_modules()
        if missing:
            raise ValueError(
                f"{BACKEND_KEY}='vllm_omni' needs the vllm-omni extra ({', '.join(missing)} not installed): run "
                f"`{VLLM_OMNI_INSTALL}` on a Linux x86-64 machine with CUDA GPUs, or use {BACKEND_KEY}=diffusers"
            )
        if available_gpus is None:
            import torch

            available_gpus = torch.cuda.device_count()
        if available_gpus < 1:
            raise ValueError(
                f"{BACKEND_KEY}='vllm_omni' needs CUDA GPUs (vllm-omni has no CPU platform) but none is available; "
                f"use {BACKEND_KEY}=diffusers on CPU"
            )
    if model_path is not None:
        adapter_path(pipeline_class(model_path), str(name), key=f"actor_rollout_ref.model.path={model_path!r}")


def pipeline_class(model_path: str) -> str | None:
    """``_class_name`` of a checkpoint's ``model_index.json`` (None when unreadable: other checks name that)."""
    try:
        index = json.loads((Path(model_path).expanduser() / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return index.get("_class_name") if isinstance(index, dict) else None
