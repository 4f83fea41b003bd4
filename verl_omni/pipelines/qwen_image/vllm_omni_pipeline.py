"""The vllm-omni backend's thin adapter for Qwen-Image: a custom vllm-omni pipeline that samples with FlowGRPO.

vllm-omni's stock Qwen-Image pipeline records no trajectory. This subclass keeps what vllm-omni built (its loaders,
the Qwen2.5-VL text encoder without its vision tower, its Qwen-Image transformer and VAE, weight loading, LoRA) and
replaces only ``forward``: the texts are encoded, sampled (true CFG with the negative prompt, the per-token rescale)
and decoded by the same code the diffusers backend runs (:class:`~.diffusers_adapter.QwenImageDiffusersAdapter`
bound to vllm-omni's modules, which have the attributes it reads), so both backends and the trainer compute one
function. The server loads it with ``custom_pipeline_args={"pipeline_class":
"verl_omni.pipelines.qwen_image.vllm_omni_pipeline.QwenImageFlowGRPOPipeline"}``; the wire format is
:mod:`verl_omni.pipelines.vllm_omni_protocol`.

Imported only inside vllm-omni's worker processes (it imports vllm-omni at module level). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput as OmniDiffusionOutput
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import QwenImagePipeline
from vllm_omni.platforms import current_omni_platform

from verl_omni.pipelines.qwen_image.diffusers_adapter import QwenImageDiffusersAdapter
from verl_omni.pipelines.qwen_image.sampling import decode_latents
from verl_omni.pipelines.vllm_omni_protocol import (
    FlowGRPOArgs,
    sample_by_group,
    sample_true_cfg,
)
from verl_omni.workers.rollout.model_spec import ModelSpec
from verl_omni.workers.rollout.vllm_omni_engine import load_tensor_lora

_DEFAULT_MAX_SEQUENCE_LENGTH = 256  # rollout.diffusion.max_sequence_length's default (the warm-up request)


class QwenImageFlowGRPOPipeline(QwenImagePipeline):
    """vllm-omni's Qwen-Image pipeline sampling with FlowGRPO's SDE and returning the trajectory per request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spec = ModelSpec.from_path(self.od_config.model)
        if current_omni_platform.is_cpu():  # verl-omni's CPU platform: float32 attention through CPU SDPA
            from verl_omni.workers.rollout.vllm_omni_cpu_attention import route_sdpa_fallbacks

            route_sdpa_fallbacks(self)

    def forward(self, req: Any) -> list[OmniDiffusionOutput]:
        """Run a vllm-omni request batch; requests with different shapes or knobs run as separate sub-batches.

        ``guidance_scale`` is Qwen-Image's ``true_cfg_scale``: above 1 each request's negative prompt is encoded and
        returned with the trajectory.
        """
        return sample_by_group(req, self._sample)

    @torch.no_grad()
    def _sample(self, req: Any, rows: Sequence[int], args: FlowGRPOArgs) -> list[OmniDiffusionOutput]:
        sp = req.sampling_params_list[rows[0]]
        adapter = QwenImageDiffusersAdapter(
            self, self._spec, sp.max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH, self.device
        )
        decode = partial(decode_latents, self.vae)
        return [OmniDiffusionOutput(**out) for out in sample_true_cfg(adapter, req, rows, args, self.device, decode)]

    def _load_diffusion_lora_adapter(self, lora_request: Any, lora_path: str, dtype: torch.dtype) -> Any:
        """vllm-omni's hook for adapters it cannot read from disk: the server's in-memory LoRA.

        vllm-omni's Qwen-Image attention holds its output projection as ``to_out``, diffusers' (and peft's) as
        ``to_out.0``; vllm-omni renames it only when it merges an adapter file into the weights, not for its LoRA
        manager (the upstream fix: patches/vllm-omni/0003). Without the rename the in-memory adapter's ``to_out.0``
        was bound to no layer (measured on CPU: log-probs 0.081 off the trainer's, 2.4e-7 without the first block's
        ``to_out.0`` in the trainer's adapter)."""
        return load_tensor_lora(lora_request, dtype, renames={"to_out.0": "to_out"})
