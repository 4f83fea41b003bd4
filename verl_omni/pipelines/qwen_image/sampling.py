"""Qwen-Image sampling: the schedule, the FlowGRPO sampling loop bound to Qwen-Image's velocity, the trainer's
log-prob recompute and decoding with the 3-D VAE; the diffusers adapter and the trainer call these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory, sample_with_bundles, score_transitions
from verl_omni.pipelines.flux.sampling import scheduler_sigmas
from verl_omni.pipelines.qwen_image.conditioning import CONDITIONING_FIELDS, predict_velocity
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks

__all__ = ["compute_log_prob", "decode_latents", "sample_flow_match_sde", "scheduler_sigmas"]
# scheduler_sigmas: QwenImagePipeline sets its schedule as FluxPipeline does (linspace(1, 1/N, N), shifted by mu
# from the packed token count; its scheduler config adds the exponential time shift and terminal sigma).


@torch.no_grad()
def sample_flow_match_sde(
    transformer: torch.nn.Module,
    sigmas: torch.Tensor,
    conditioning: Conditioning,
    negative_conditioning: Conditioning | None,
    generators: Sequence[torch.Generator],
    latent_shape: Sequence[int],
    guidance_scale: float = 1.0,
    noise_level: float = 0.7,
    sde_window: Sequence[int] | None = None,
    chunk_size: int | None = None,
    sde_type: str = "sde",
) -> SDETrajectory:
    """FlowGRPO sampling of a Qwen-Image transformer:
    :func:`~verl_omni.pipelines.flow_match_sde.sample_sde_trajectory` with Qwen-Image's (true-CFG) velocity.
    ``conditioning`` (and the negative, with ``guidance_scale > 1``) are batched bundles of
    :data:`~verl_omni.pipelines.qwen_image.conditioning.CONDITIONING_FIELDS`; ``latent_shape`` is the unpacked
    (C, h, w), drawn as ``QwenImagePipeline`` draws its initial noise before packing."""
    return sample_with_bundles(
        lambda x, sigma, pos, neg: predict_velocity(transformer, x, sigma, pos, neg, guidance_scale),
        CONDITIONING_FIELDS,
        conditioning,
        negative_conditioning,
        sigmas,
        generators,
        latent_shape,
        noise_level=noise_level,
        sde_window=sde_window,
        chunk_size=chunk_size,
        sde_type=sde_type,
    )


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Decode (B, C, h, w) latents with ``AutoencoderKLQwenImage`` (one frame) to images in [-1, 1], de-normalised
    with the VAE's per-channel ``latents_mean`` / ``latents_std`` as ``QwenImagePipeline`` does.

    Batch-invariant: chunks of ``chunk_size`` latents, padded with zeros.
    """
    z = latents.unsqueeze(2).to(vae.dtype)  # (B, C, 1, h, w): the VAE's frame axis
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
    z = z / inv_std + mean
    return map_chunks(lambda zc: vae.decode(zc, return_dict=False)[0][:, :, 0], [z], chunk_size, fill=0.0)


def compute_log_prob(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    sigmas: torch.Tensor,
    sigmas_next: torch.Tensor,
    conditioning: Conditioning,
    negative_conditioning: Conditioning | None = None,
    guidance_scale: float = 1.0,
    noise_level: float = 0.7,
    detach_uncond: bool = True,
    dtype: torch.dtype | None = None,
    sde_type: str = "sde",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of stored transitions ``latents -> next_latents`` (B, C, h, w) under a Qwen-Image ``transformer``.

    The trainer binding (same signature as SD3's, see :func:`verl_omni.pipelines.sd3.sampling.compute_log_prob`):
    the velocity the sampler used (true CFG with the norm rescale when ``guidance_scale > 1``) and the shared SDE
    step. Returns ``(log_prob (B,), prev_sample_mean (B, C, h, w), std_dev (B, 1, 1, 1))``, float32.
    """
    velocity = predict_velocity(
        transformer,
        latents,
        sigmas,
        conditioning,
        negative_conditioning,
        guidance_scale,
        detach_uncond=detach_uncond,
        dtype=dtype,
    )
    return score_transitions(velocity, latents, next_latents, sigmas, sigmas_next, noise_level, sde_type, noise)
