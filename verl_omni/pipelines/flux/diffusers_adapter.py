"""The diffusers backend's thin adapter for FLUX.1: binds the shared FLUX sampling to a loaded
``diffusers.FluxPipeline`` (its CLIP and T5 encoders, scheduler, transformer and VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory
from verl_omni.pipelines.flux.sampling import sample_flow_match_sde, scheduler_sigmas
from verl_omni.pipelines.sd3.conditioning import encode_texts, stack_encodings
from verl_omni.pipelines.sd3.sampling import decode_latents, images_to_uint8
from verl_omni.protocol import Conditioning


class FluxDiffusersAdapter:
    """What the diffusers engine asks of a model family, for FLUX.1 checkpoints.

    Args:
        pipe: the loaded ``FluxPipeline`` (on ``device``).
        spec: the checkpoint's :class:`~verl_omni.workers.rollout.model_spec.ModelSpec`.
        max_sequence_length: T5 tokens of the text conditioning.
    """

    def __init__(self, pipe: Any, spec: Any, max_sequence_length: int, device: torch.device):
        self.pipe = pipe
        self.spec = spec
        self.max_sequence_length = max_sequence_length
        self.device = device

    def encode(self, texts: list[str], chunk_size: int | None) -> list[Conditioning]:
        """Per-text host conditioning bundles of ``texts`` (one pass of both text encoders per chunk)."""

        def encode_chunk(chunk: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=chunk, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
            return embeds, pooled

        return encode_texts(encode_chunk, texts, chunk_size)

    def sigmas(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The scheduler's sigmas (N + 1 values) for this image size."""
        return scheduler_sigmas(self.pipe.scheduler, num_inference_steps, height, width, self.spec.vae_scale_factor)

    def sample(
        self,
        encodings: Sequence[Conditioning],
        negative_encodings: Sequence[Conditioning] | None,
        generators: Sequence[torch.Generator],
        params: Any,
        chunk_size: int | None,
    ) -> SDETrajectory:
        """FlowGRPO-sample one batch with resolved sampling ``params``; ``negative_encodings`` must be None."""
        if negative_encodings is not None:
            raise ValueError("FLUX.1 is guidance-distilled: it samples without a negative prompt")
        latent_shape = self.spec.latent_shape(params.height, params.width)
        return sample_flow_match_sde(
            self.pipe.transformer,
            self.sigmas(params.num_inference_steps, params.height, params.width),
            stack_encodings(encodings, self.device),
            generators,
            latent_shape,
            guidance_scale=params.guidance_scale,
            noise_level=params.noise_level,
            sde_window=params.sde_window,
            chunk_size=chunk_size,
            sde_type=params.sde_type,
        )

    def decode(self, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images on the host (FLUX decodes unpacked latents as SD3 does)."""
        return images_to_uint8(decode_latents(self.pipe.vae, latents, chunk_size))
