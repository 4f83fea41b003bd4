"""Starting vllm-omni's ``AsyncOmni`` for the ``vllm_omni`` rollout server: the only module that imports vllm.

Imported lazily, inside the server actor when it starts, so that verl-omni imports, configures and tests without
the vllm-omni extra. Not yet run on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VllmOmniApi:
    """The engine and the vllm-omni request types the server builds (a test passes doubles of all three)."""

    engine: Any
    sampling_params_cls: type
    lora_request_cls: type


def start_async_omni(model_path: str, engine_kwargs: dict[str, Any]) -> VllmOmniApi:
    """Start ``AsyncOmni(model=model_path, **engine_kwargs)`` (its stage processes load the pipeline)."""
    from verl.utils.vllm.utils import TensorLoRARequest  # verl's in-memory LoRA request (peft_config + tensors)
    from vllm_omni.entrypoints.async_omni import AsyncOmni
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    engine = AsyncOmni(model=model_path, **engine_kwargs)
    return VllmOmniApi(
        engine=engine, sampling_params_cls=OmniDiffusionSamplingParams, lora_request_cls=TensorLoRARequest
    )
