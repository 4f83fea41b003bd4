"""The vllm-omni backend's thin adapter for Wan text-to-video: a custom vllm-omni pipeline that samples with FlowGRPO.

vllm-omni 0.28 serves ``WanPipeline`` checkpoints with its ``Wan22Pipeline``, which records no trajectory. This
subclass keeps what vllm-omni built (its loaders, the UMT5 encoder, its Wan transformer with the fused self-attention
``to_qkv``, the causal 3-D VAE, weight loading, LoRA) and replaces only ``forward``: the texts are encoded, sampled
(true CFG with the negative prompt, two transformer passes) and the videos decoded by the same code the diffusers
backend runs (:class:`~.diffusers_adapter.WanDiffusersAdapter` bound to vllm-omni's modules, which have the
attributes it reads), so both backends and the trainer compute one function. The server loads it with
``custom_pipeline_args={"pipeline_class": "verl_omni.pipelines.wan.vllm_omni_pipeline.WanFlowGRPOPipeline"}``; the wire
format is :mod:`verl_omni.pipelines.vllm_omni_protocol`.

What differs from the stock ``Wan22Pipeline``:

- the schedule: ``Wan22Pipeline`` builds its own ``FlowUniPCMultistepScheduler`` with ``od_config.flow_shift`` (5.0
  unless the engine sets it) and ignores the checkpoint's scheduler (Wan2.1-T2V-1.3B-Diffusers ships ``flow_shift``
  3.0). FlowGRPO samples between the checkpoint's noise levels, as the diffusers backend and the trainer do, so this
  pipeline loads the checkpoint's scheduler (:func:`~verl_omni.workers.rollout.model_spec.load_scheduler`);
- nothing of torchvision: vllm-omni's Wan package imports it for its image- and speech-to-video pipelines, and
  vLLM's CPU build has none (:mod:`.vllm_omni_imports`);
- the output: the decoded video in [-1, 1] ``(1, 3, F, H, W)`` per request, as ``Wan22Pipeline`` returns it; vllm-omni's
  Wan post-processing turns it into frames in [0, 1], which the server rounds as the diffusers backend rounds.

Imported only inside vllm-omni's worker processes (it imports vllm-omni at module level). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from verl_omni.pipelines.wan.vllm_omni_imports import finish_wan2_2_package, register_wan2_2_package

register_wan2_2_package()  # before any import of vllm-omni's Wan package: loadable without torchvision

from vllm_omni.diffusion.data import DiffusionOutput as OmniDiffusionOutput  # noqa: E402
from vllm_omni.diffusion.models.wan2_2.pipeline_wan2_2 import Wan22Pipeline  # noqa: E402
from vllm_omni.platforms import current_omni_platform  # noqa: E402

from verl_omni.pipelines.vllm_omni_protocol import (  # noqa: E402
    FlowGRPOArgs,
    sample_by_group,
    sample_true_cfg,
)
from verl_omni.pipelines.wan.diffusers_adapter import WanDiffusersAdapter  # noqa: E402
from verl_omni.pipelines.wan.sampling import decode_pixels  # noqa: E402
from verl_omni.workers.rollout.model_spec import ModelSpec, load_scheduler  # noqa: E402
from verl_omni.workers.rollout.vllm_omni_engine import load_tensor_lora  # noqa: E402

_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # WanPipeline's


class WanFlowGRPOPipeline(Wan22Pipeline):
    """vllm-omni's Wan pipeline sampling with FlowGRPO's SDE and returning the trajectory per request."""

    def __init__(self, **kwargs: Any) -> None:
        finish_wan2_2_package()  # before the VAE is built, as vllm-omni's Wan package __init__ does on import
        super().__init__(**kwargs)
        self._spec = ModelSpec.from_path(self.od_config.model, backend="vllm_omni")
        self.scheduler = load_scheduler(self.od_config.model)  # the checkpoint's schedule, not od_config.flow_shift's
        if current_omni_platform.is_cpu():  # verl-omni's CPU platform: float32 attention through CPU SDPA
            from verl_omni.workers.rollout.vllm_omni_cpu_attention import route_sdpa_fallbacks

            route_sdpa_fallbacks(self)

    def forward(self, req: Any) -> list[OmniDiffusionOutput]:
        """Run a vllm-omni request batch; requests with different shapes (frames included) or knobs run as separate
        sub-batches. ``guidance_scale`` above 1 runs true CFG with each request's negative prompt, which is encoded and
        returned with the trajectory."""
        return sample_by_group(req, self._sample)

    @torch.no_grad()
    def _sample(self, req: Any, rows: Sequence[int], args: FlowGRPOArgs) -> list[OmniDiffusionOutput]:
        sp = req.sampling_params_list[rows[0]]
        adapter = WanDiffusersAdapter(
            self, self._spec, sp.max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH, self.device
        )
        decode = partial(decode_pixels, self.vae)
        return [OmniDiffusionOutput(**out) for out in sample_true_cfg(adapter, req, rows, args, self.device, decode)]

    def _load_diffusion_lora_adapter(self, lora_request: Any, lora_path: str, dtype: torch.dtype) -> Any:
        """vllm-omni's hook for adapters it cannot read from disk: the server's in-memory LoRA.

        vllm-omni's Wan attention holds its output projection as ``to_out``, diffusers' (and peft's) as ``to_out.0``;
        vllm-omni renames it only when it merges an adapter file into the weights, not for the LoRA manager (the
        upstream fix: patches/vllm-omni/0003). Renamed here, or the adapter's ``to_out.0`` is bound to no layer."""
        return load_tensor_lora(lora_request, dtype, renames={"to_out.0": "to_out"})
