"""Wan sampling: the scheduler's flow sigmas, the FlowGRPO sampling loop bound to Wan's velocity, the trainer's
log-prob recompute and VAE decoding to videos; the diffusers adapter and the trainer call these, never a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory, sample_with_bundles, score_transitions
from verl_omni.pipelines.sd3.sampling import images_to_uint8
from verl_omni.pipelines.wan.conditioning import CONDITIONING_FIELDS, predict_velocity
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks


def scheduler_sigmas(scheduler: Any, num_inference_steps: int) -> torch.Tensor:
    """The sigmas (N + 1 values, from at most 1 down to 0) the Wan pipeline's scheduler sets for N steps.

    Wan's schedule does not depend on the video size: a fixed shift (``shift`` of ``FlowMatchEulerDiscreteScheduler``,
    ``flow_shift`` of the ``UniPCMultistepScheduler`` the published checkpoints ship, with ``use_flow_sigmas``).
    The FlowGRPO sampler takes its own (SDE or Euler) steps between these noise levels; a scheduler whose sigmas
    are not such a flow schedule is refused.
    """
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    sigmas = torch.as_tensor(getattr(scheduler, "sigmas", []), dtype=torch.float32).clone()
    flow = (
        sigmas.ndim == 1
        and sigmas.numel() == num_inference_steps + 1
        and float(sigmas[0]) <= 1.0
        and float(sigmas[-1]) == 0.0
        and bool((sigmas[1:] < sigmas[:-1]).all())
    )
    if not flow:
        raise ValueError(
            f"the {type(scheduler).__name__} of this Wan checkpoint sets no flow-matching schedule (sigmas from 1 to "
            f"0, N + 1 values); valid choices: FlowMatchEulerDiscreteScheduler, or UniPCMultistepScheduler with "
            "use_flow_sigmas=true and final_sigmas_type='zero'"
        )
    return sigmas


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
    """FlowGRPO sampling of a Wan transformer: :func:`~verl_omni.pipelines.flow_match_sde.sample_sde_trajectory` with
    Wan's (guided) velocity; ``latent_shape`` is the video's ``(C, f, h, w)``, drawn as ``WanPipeline`` draws its
    initial noise (one generator per sample)."""
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
def decode_pixels(vae: torch.nn.Module, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """VAE-decode (B, C, f, h, w) latents to videos (B, 3, F, H, W) in [-1, 1] (the VAE's dtype), as ``WanPipeline``
    does before its video processor (per-channel de-normalisation with the VAE's ``latents_mean`` /
    ``latents_std``). Batch-invariant: chunks of ``chunk_size`` videos, padded with zeros."""
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
    z = latents.to(vae.dtype) / inv_std + mean  # WanPipeline's arithmetic, so the frames match it bit for bit
    return map_chunks(lambda zc: vae.decode(zc, return_dict=False)[0], [z], chunk_size, fill=0.0)


def videos_to_uint8(videos: torch.Tensor) -> torch.Tensor:
    """Decoded videos (B, 3, F, H, W) in [-1, 1] as uint8 (B, F, 3, H, W) on the host, frames first as
    ``WanPipeline``'s video processor returns them, rounded as it rounds."""
    return images_to_uint8(videos.permute(0, 2, 1, 3, 4))


@torch.no_grad()
def decode_videos(vae: torch.nn.Module, latents: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """VAE-decode (B, C, f, h, w) latents to uint8 videos (B, F, 3, H, W) on the host: :func:`decode_pixels`, then
    :func:`videos_to_uint8`."""
    return videos_to_uint8(decode_pixels(vae, latents, chunk_size))


def schedule_sigmas(
    scheduler: Any,
    num_inference_steps: int,
    height: int | None = None,
    width: int | None = None,
    vae_scale_factor: int | None = None,
    patch_size: int | None = None,
) -> torch.Tensor:
    """:func:`scheduler_sigmas` with the registry's schedule signature (the vllm_omni server's timestep check):
    Wan's schedule does not depend on the video size, which is accepted and ignored."""
    return scheduler_sigmas(scheduler, num_inference_steps)


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
    """Log-prob of stored video transitions ``latents -> next_latents`` (B, C, f, h, w) under a Wan ``transformer``.

    The trainer binding (same signature as SD3's, see :func:`verl_omni.pipelines.sd3.sampling.compute_log_prob`):
    the sampler's velocity and the shared SDE step; the log-prob is a mean over channels, frames and pixels.
    Returns ``(log_prob (B,), prev_sample_mean (B, C, f, h, w), std_dev (B, 1, 1, 1, 1))``, float32.
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
