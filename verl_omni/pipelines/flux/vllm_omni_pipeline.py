"""The vllm-omni backend's thin adapter for FLUX.1: a custom vllm-omni pipeline that samples with FlowGRPO.

vllm-omni's stock FLUX pipeline records no trajectory. This subclass keeps what vllm-omni built (its loaders, its
FLUX transformer, CLIP and T5 encoders and VAE, weight loading, LoRA) and replaces only ``forward`` with the
project's FLUX sampling (:mod:`verl_omni.pipelines.flux.sampling`: the one shared SDE loop bound to FLUX's
velocity: 2x2 packing, position ids, embedded guidance, no negative), so both backends and the trainer run the
same math. The server loads it with ``custom_pipeline_args={"pipeline_class":
"verl_omni.pipelines.flux.vllm_omni_pipeline.FluxFlowGRPOPipeline"}``; the wire format is
:mod:`verl_omni.pipelines.vllm_omni_protocol`.

Imported only inside vllm-omni's worker processes (it imports vllm-omni at module level). Not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput as OmniDiffusionOutput
from vllm_omni.diffusion.models.flux import FluxTransformer2DModel
from vllm_omni.diffusion.models.flux.pipeline_flux import FluxPipeline
from vllm_omni.platforms import current_omni_platform

from verl_omni.pipelines.flux.sampling import sample_flow_match_sde, scheduler_sigmas
from verl_omni.pipelines.sd3.conditioning import encode_texts, stack_encodings
from verl_omni.pipelines.sd3.sampling import decode_latents
from verl_omni.pipelines.vllm_omni_protocol import (
    FlowGRPOArgs,
    pack_trajectory,
    request_generators,
    sample_by_group,
)
from verl_omni.workers.rollout.vllm_omni_engine import load_tensor_lora

_DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's


def _prompt_text(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else (prompt.get("prompt") or "")


def _stacked_params_mapping() -> list[tuple[str, str, str]]:
    """``(".to_qkv", ".to_q", "q")``, ... for every fused layer of vllm-omni's FLUX transformer."""
    return [
        (f".{packed}", f".{sub}", shard)
        for packed, subs in FluxTransformer2DModel.packed_modules_mapping.items()
        for sub, shard in zip(subs, ("q", "k", "v"), strict=True)
    ]


class FluxFlowGRPOPipeline(FluxPipeline):
    """vllm-omni's FLUX pipeline sampling with FlowGRPO's SDE and returning the trajectory per request."""

    # vllm-omni 0.28's LoRA manager learns which fused layer holds which peft targets (``to_qkv``: ``to_q``,
    # ``to_k``, ``to_v``) only from a module's ``stacked_params_mapping``; its FLUX transformer declares them as
    # ``packed_modules_mapping`` instead, so an adapter on to_q/k/v (every FLUX recipe's) was silently applied to
    # ``to_out`` alone (measured on CPU: the engine sampled the policy of the adapter's to_out.0 part, log-prob
    # gap 0, and not the whole adapter's, gap 5.6e-3). Declared here, on the pipeline the manager scans.
    stacked_params_mapping = _stacked_params_mapping()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if current_omni_platform.is_cpu():  # verl-omni's CPU platform: float32 attention through CPU SDPA
            from verl_omni.workers.rollout.vllm_omni_cpu_attention import route_sdpa_fallbacks

            route_sdpa_fallbacks(self)

    def forward(self, req: Any) -> list[OmniDiffusionOutput]:
        """Run a vllm-omni request batch; requests with different shapes or knobs run as separate sub-batches.

        FLUX.1 is guidance-distilled: ``guidance_scale`` is the transformer's guidance input and a request's
        negative prompt (the server sends ``""``) is not encoded.
        """
        return sample_by_group(req, self._sample)

    @torch.no_grad()
    def _sample(self, req: Any, rows: Sequence[int], args: FlowGRPOArgs) -> list[OmniDiffusionOutput]:
        sp = req.sampling_params_list[rows[0]]
        max_len = sp.max_sequence_length or _DEFAULT_MAX_SEQUENCE_LENGTH

        def encode(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled, _ = self.encode_prompt(prompt=chunk, prompt_2=None, max_sequence_length=max_len)
            return embeds, pooled

        encodings = encode_texts(encode, [_prompt_text(req.prompts[i]) for i in rows], args.chunk_size)
        generators = request_generators(req, rows, self.device)
        sigmas = scheduler_sigmas(self.scheduler, sp.num_inference_steps, sp.height, sp.width, self.vae_scale_factor)
        latent_shape = (
            self.transformer.in_channels // 4,  # the 2x2 packing: 4 latent channels per token channel group
            sp.height // self.vae_scale_factor,
            sp.width // self.vae_scale_factor,
        )
        traj = sample_flow_match_sde(
            self.transformer,
            sigmas,
            stack_encodings(encodings, self.device),
            generators,
            latent_shape,
            guidance_scale=sp.guidance_scale,
            noise_level=args.noise_level,
            sde_window=args.sde_window,
            chunk_size=args.chunk_size,
            sde_type=args.sde_type,
        )
        images = decode_latents(self.vae, traj.final_latents, args.chunk_size)
        return [
            OmniDiffusionOutput(
                output=images[j : j + 1], **pack_trajectory(traj, j, encodings[j], None, record_noise=args.record_noise)
            )
            for j in range(len(rows))
        ]

    def _load_diffusion_lora_adapter(self, lora_request: Any, lora_path: str, dtype: torch.dtype) -> Any:
        """vllm-omni's hook for adapters it cannot read from disk: the server's in-memory LoRA."""
        return load_tensor_lora(lora_request, dtype)
