"""The diffusers backend's thin adapter for Wan text-to-video: binds the shared Wan sampling to a loaded
``diffusers.WanPipeline`` (its UMT5 encoder, scheduler, transformer and causal 3-D VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory
from verl_omni.pipelines.wan.conditioning import encode_texts, stack_encodings
from verl_omni.pipelines.wan.sampling import decode_videos, sample_flow_match_sde, scheduler_sigmas
from verl_omni.protocol import Conditioning


class WanDiffusersAdapter:
    """What the diffusers engine asks of a model family, for ``WanPipeline`` checkpoints.

    Args:
        pipe: the loaded ``WanPipeline`` (on ``device``).
        spec: the checkpoint's :class:`~verl_omni.workers.rollout.model_spec.ModelSpec` (a video spec).
        max_sequence_length: UMT5 tokens of the text conditioning.
    """

    def __init__(self, pipe: Any, spec: Any, max_sequence_length: int, device: torch.device):
        self.pipe = pipe
        self.spec = spec
        self.max_sequence_length = max_sequence_length
        self.device = device

    def encode(self, texts: list[str], chunk_size: int | None) -> list[Conditioning]:
        """Per-text host conditioning bundles of ``texts`` (one UMT5 pass per chunk; a CFG negative is a text too)."""

        def encode_chunk(chunk: list[str]) -> torch.Tensor:
            embeds, _ = self.pipe.encode_prompt(
                prompt=chunk,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
                device=self.device,
            )
            return embeds

        return encode_texts(encode_chunk, texts, chunk_size)

    def sample(
        self,
        encodings: Sequence[Conditioning],
        negative_encodings: Sequence[Conditioning] | None,
        generators: Sequence[torch.Generator],
        params: Any,
        chunk_size: int | None,
    ) -> SDETrajectory:
        """FlowGRPO-sample one batch of videos with resolved sampling ``params`` (``num_frames`` set)."""
        negative = None if negative_encodings is None else stack_encodings(negative_encodings, self.device)
        return sample_flow_match_sde(
            self.pipe.transformer,
            scheduler_sigmas(self.pipe.scheduler, params.num_inference_steps),
            stack_encodings(encodings, self.device),
            negative,
            generators,
            self.spec.latent_shape(params.height, params.width, params.num_frames),
            guidance_scale=params.guidance_scale,
            noise_level=params.noise_level,
            sde_window=params.sde_window,
            chunk_size=chunk_size,
            sde_type=params.sde_type,
        )

    def decode(self, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """uint8 videos (B, F, 3, H, W) on the host."""
        return decode_videos(self.pipe.vae, latents, chunk_size)
