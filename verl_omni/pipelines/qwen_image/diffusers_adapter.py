"""The diffusers backend's thin adapter for Qwen-Image: binds the shared Qwen-Image conditioning and sampling to a
loaded ``diffusers.QwenImagePipeline`` (its Qwen2.5-VL text encoder, scheduler, transformer and VAE)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory
from verl_omni.pipelines.qwen_image.conditioning import CONDITIONING_FIELDS, encode_prompts
from verl_omni.pipelines.qwen_image.sampling import decode_latents, sample_flow_match_sde, scheduler_sigmas
from verl_omni.pipelines.sd3.sampling import images_to_uint8
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks


class QwenImageDiffusersAdapter:
    """What the diffusers engine asks of a model family, for Qwen-Image checkpoints.

    Args:
        pipe: the loaded ``QwenImagePipeline`` (on ``device``).
        spec: the checkpoint's :class:`~verl_omni.workers.rollout.model_spec.ModelSpec`.
        max_sequence_length: prompt tokens every text is padded (or cut) to after the template.
    """

    def __init__(self, pipe: Any, spec: Any, max_sequence_length: int, device: torch.device):
        self.pipe = pipe
        self.spec = spec
        self.max_sequence_length = max_sequence_length
        self.device = device

    def encode(self, texts: list[str], chunk_size: int | None) -> list[Conditioning]:
        """Per-text host conditioning bundles of ``texts`` (one text-encoder pass per chunk; batch-invariant: chunks
        of ``chunk_size`` texts padded with empty prompts, every text at the fixed length)."""
        embeds, mask = map_chunks(
            lambda chunk: encode_prompts(self.pipe, chunk, self.max_sequence_length, self.device),
            [texts],
            chunk_size,
            fill="",
        )
        embeds, mask = embeds.float().cpu(), mask.cpu()
        return [
            dict(zip(CONDITIONING_FIELDS, (embeds[i].clone(), mask[i].clone()), strict=True)) for i in range(len(texts))
        ]

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
        """FlowGRPO-sample one batch with resolved sampling ``params``; the negatives run true CFG
        (``guidance_scale`` is ``true_cfg_scale``)."""
        negatives = None if negative_encodings is None else _stack(negative_encodings, self.device)
        return sample_flow_match_sde(
            self.pipe.transformer,
            self.sigmas(params.num_inference_steps, params.height, params.width),
            _stack(encodings, self.device),
            negatives,
            generators,
            self.spec.latent_shape(params.height, params.width),
            guidance_scale=params.guidance_scale,
            noise_level=params.noise_level,
            sde_window=params.sde_window,
            chunk_size=chunk_size,
            sde_type=params.sde_type,
        )

    def decode(self, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
        """uint8 (B, 3, H, W) images on the host."""
        return images_to_uint8(decode_latents(self.pipe.vae, latents, chunk_size))


def _stack(encodings: Sequence[Conditioning], device: torch.device) -> Conditioning:
    return {name: torch.stack([e[name] for e in encodings]).to(device) for name in CONDITIONING_FIELDS}
