"""The vllm-omni backend's thin adapter for SD3: a custom vllm-omni pipeline that samples with FlowGRPO.

vllm-omni's stock SD3 pipeline records no trajectory. This subclass keeps everything vllm-omni built (its
loaders, its SD3 transformer, text encoders and VAE, weight loading) and replaces only ``forward`` with the
project's shared SD3 conditioning and sampling, so both backends run the same math. The server loads it with
``custom_pipeline_args={"pipeline_class": "verl_omni.pipelines.sd3.vllm_omni_pipeline.SD3FlowGRPOPipeline"}``;
the wire format is :mod:`verl_omni.pipelines.vllm_omni_protocol`.

Imported only inside vllm-omni's worker processes (it imports vllm-omni at module level). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput as OmniDiffusionOutput
from vllm_omni.diffusion.models.sd3.pipeline_sd3 import StableDiffusion3Pipeline
from vllm_omni.platforms import current_omni_platform

from verl_omni.pipelines.sd3.conditioning import encode_texts, stack_encodings
from verl_omni.pipelines.sd3.sampling import decode_latents, sample_flow_match_sde, scheduler_sigmas
from verl_omni.pipelines.vllm_omni_protocol import (
    FlowGRPOArgs,
    pack_trajectory,
    prompt_field,
    request_generators,
    sample_by_group,
)
from verl_omni.workers.rollout.vllm_omni_engine import load_tensor_lora

_DEFAULT_MAX_SEQUENCE_LENGTH = 256


class SD3FlowGRPOPipeline(StableDiffusion3Pipeline):
    """vllm-omni's SD3 pipeline sampling with FlowGRPO's SDE and returning the trajectory per request."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if current_omni_platform.is_cpu():  # verl-omni's CPU platform: float32 attention through CPU SDPA
            from verl_omni.workers.rollout.vllm_omni_cpu_attention import route_sdpa_fallbacks

            route_sdpa_fallbacks(self)

    def forward(self, req: Any) -> list[OmniDiffusionOutput]:
        """Run a vllm-omni request batch; requests with different shapes or knobs run as separate sub-batches.

        vllm-omni's start-up warm-up request (no ``extra_args``, no seed) runs the whole schedule as SDE steps.
        """
        return sample_by_group(req, self._sample)

    @torch.no_grad()
    def _sample(self, req: Any, rows: Sequence[int], args: FlowGRPOArgs) -> list[OmniDiffusionOutput]:
        sp = req.sampling_params_list[rows[0]]
        max_len = sp.max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH

        def encode(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return self.encode_prompt(prompt=chunk, prompt_2=None, prompt_3=None, max_sequence_length=max_len)

        prompts = [req.prompts[i] for i in rows]
        encodings = encode_texts(encode, [prompt_field(p, "prompt") for p in prompts], args.chunk_size)
        do_cfg = sp.guidance_scale > 1.0
        negatives = None
        if do_cfg:
            negatives = encode_texts(encode, [prompt_field(p, "negative_prompt") for p in prompts], args.chunk_size)
        generators = request_generators(req, rows, self.device)
        sigmas = scheduler_sigmas(
            self.scheduler, sp.num_inference_steps, sp.height, sp.width, self.vae_scale_factor, self.patch_size
        )
        latent_shape = (
            self.transformer.in_channels,
            sp.height // self.vae_scale_factor,
            sp.width // self.vae_scale_factor,
        )
        traj = sample_flow_match_sde(
            self.transformer,
            sigmas,
            stack_encodings(encodings, self.device),
            stack_encodings(negatives, self.device) if negatives else None,
            generators,
            latent_shape,
            guidance_scale=sp.guidance_scale,
            noise_level=args.noise_level,
            sde_window=args.sde_window,
            chunk_size=args.chunk_size,
            sde_type=args.sde_type,
        )
        images = decode_latents(self.vae, traj.final_latents, args.chunk_size)
        outputs = []
        for j in range(len(rows)):
            negative = negatives[j] if negatives else None
            trajectory = pack_trajectory(traj, j, encodings[j], negative, record_noise=args.record_noise)
            outputs.append(OmniDiffusionOutput(output=images[j : j + 1], **trajectory))
        return outputs

    def _load_diffusion_lora_adapter(self, lora_request: Any, lora_path: str, dtype: torch.dtype) -> Any:
        """vllm-omni's hook for adapters it cannot read from disk: an in-memory LoRA (``lora_tensors`` and
        ``peft_config`` on the request, as verl's ``TensorLoRARequest``) becomes a vLLM ``LoRAModel``."""
        return load_tensor_lora(lora_request, dtype)
