"""FLUX sampling: the scheduler's sigmas as ``FluxPipeline`` sets them, the FlowGRPO sampling loop bound to
FLUX's velocity, and the trainer's log-prob recompute; the diffusers adapter and the trainer call these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory, sample_with_bundles, score_transitions
from verl_omni.pipelines.flux.conditioning import predict_velocity
from verl_omni.pipelines.sd3.conditioning import CONDITIONING_FIELDS
from verl_omni.protocol import Conditioning


def scheduler_sigmas(
    scheduler: Any, num_inference_steps: int, height: int, width: int, vae_scale_factor: int, patch_size: int = 2
) -> torch.Tensor:
    """The sigmas (N + 1 values) of FLUX's ``FlowMatchEulerDiscreteScheduler`` as ``FluxPipeline`` sets them:
    ``linspace(1, 1/N, N)`` shifted by ``mu``, which grows with the packed image's token count (``patch_size``:
    the 2x2 packing). SD3's signature, so a server can call either family's schedule the same way."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    sigmas = (
        None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    )
    seq_len = (height // vae_scale_factor // patch_size) * (width // vae_scale_factor // patch_size)
    mu = calculate_shift(
        seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    if sigmas is None:
        scheduler.set_timesteps(num_inference_steps, device="cpu", mu=mu)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
    return scheduler.sigmas.clone()


@torch.no_grad()
def sample_flow_match_sde(
    transformer: torch.nn.Module,
    sigmas: torch.Tensor,
    conditioning: Conditioning,
    generators: Sequence[torch.Generator],
    latent_shape: Sequence[int],
    guidance_scale: float = 1.0,
    noise_level: float = 0.7,
    sde_window: Sequence[int] | None = None,
    chunk_size: int | None = None,
    sde_type: str = "sde",
) -> SDETrajectory:
    """FlowGRPO sampling of a FLUX transformer: :func:`~verl_omni.pipelines.flow_match_sde.sample_sde_trajectory`
    with FLUX's velocity (embedded guidance, no negative); ``latent_shape`` is the unpacked (C, h, w), drawn as
    ``FluxPipeline`` draws its initial noise before packing."""
    return sample_with_bundles(
        lambda x, sigma, pos, _neg: predict_velocity(transformer, x, sigma, pos, guidance_scale),
        CONDITIONING_FIELDS,
        conditioning,
        None,  # guidance-distilled: no negative
        sigmas,
        generators,
        latent_shape,
        noise_level=noise_level,
        sde_window=sde_window,
        chunk_size=chunk_size,
        sde_type=sde_type,
    )


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
    """Log-prob of stored transitions ``latents -> next_latents`` (B, C, h, w) under a FLUX ``transformer``.

    The trainer binding (same signature as SD3's, see :func:`verl_omni.pipelines.sd3.sampling.compute_log_prob`).
    FLUX.1 is guidance-distilled: ``guidance_scale`` is the embedded guidance the rollout used, there is no
    negative branch, so ``negative_conditioning`` must be None and ``detach_uncond`` has nothing to detach.
    """
    if negative_conditioning is not None:
        raise ValueError("FLUX.1 has no classifier-free guidance negative: negative_conditioning must be None")
    velocity = predict_velocity(transformer, latents, sigmas, conditioning, guidance_scale, dtype=dtype)
    return score_transitions(velocity, latents, next_latents, sigmas, sigmas_next, noise_level, sde_type, noise)
