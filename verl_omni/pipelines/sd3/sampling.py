"""SD3 sampling: the scheduler's sigmas, the FlowGRPO sampling loop bound to SD3's velocity, the trainer's
log-prob recompute and VAE decoding; every backend and the trainer call these, never a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from verl_omni.pipelines.flow_match_sde import SDETrajectory, sample_with_bundles, score_transitions
from verl_omni.pipelines.sd3.conditioning import CONDITIONING_FIELDS, predict_velocity
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks


def scheduler_sigmas(
    scheduler: Any, num_inference_steps: int, height: int, width: int, vae_scale_factor: int, patch_size: int
) -> torch.Tensor:
    """The sigmas (N + 1 values) of a ``FlowMatchEulerDiscreteScheduler`` exactly as the SD3 pipeline sets them.

    Any backend's SD3 scheduler (and the vllm-omni server, which has no model loaded) gets the same schedule.
    """
    kwargs: dict[str, Any] = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        seq_len = (height // vae_scale_factor // patch_size) * (width // vae_scale_factor // patch_size)
        kwargs["mu"] = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_inference_steps, device="cpu", **kwargs)
    return scheduler.sigmas.clone()


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
    """FlowGRPO sampling of an SD3 transformer: :func:`~verl_omni.pipelines.flow_match_sde.sample_sde_trajectory`
    with SD3's (guided) velocity; see there for the arguments. ``conditioning`` (and the CFG negative) are batched
    bundles of :data:`~verl_omni.pipelines.sd3.conditioning.CONDITIONING_FIELDS`; ``latent_shape`` is (C, h, w)."""
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
    """VAE-decode (B, C, h, w) latents to images in [-1, 1] (the VAE's dtype), as the SD3 pipeline does.

    Batch-invariant: chunks of ``chunk_size`` latents, padded with zeros.
    """
    z = (latents / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype)
    return map_chunks(lambda zc: vae.decode(zc, return_dict=False)[0], [z], chunk_size, fill=0.0)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 (B, 3, H, W) on the host, rounded as diffusers' image processor rounds."""
    return ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


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
    """Log-prob of stored transitions ``latents -> next_latents`` under ``transformer`` (with gradients).

    The trainer's half of FlowGRPO: the same velocity and SDE-step math the sampler used, on a batch of
    transitions that may come from different samples and steps.

    Args:
        latents, next_latents: (B, C, h, w) stored ``x_s`` and ``x_next``.
        sigmas, sigmas_next: (B,) their noise levels.
        conditioning: the batched bundle the samples used; ``negative_conditioning`` is required when
            ``guidance_scale > 1`` (use the sampler's guidance scale).
        noise_level: the sampler's ``noise_level``; ``sde_type``: its step (``sde`` or ``cps``).
        noise: (B, C, h, w) the sampler's draws: score the transitions re-centred on this policy's means
            (:func:`~verl_omni.pipelines.flow_match_sde.score_transitions`), not ``next_latents``.
        detach_uncond: with CFG, back-propagate through the conditional branch only (the reference's choice;
            ``actor_rollout_ref.actor.cfg_detach_uncond``).
        dtype: the transformer's compute dtype (the trainer's mixed-precision ``param_dtype``); None: its
            parameters' dtype. See :func:`~verl_omni.pipelines.sd3.conditioning.predict_velocity`.

    Returns:
        ``(log_prob (B,), prev_sample_mean (B, C, h, w), std_dev (B, 1, 1, 1))``, float32.
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
