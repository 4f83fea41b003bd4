"""FLUX's velocity: the transformer reads 2x2-packed latents with per-token position ids and, on
guidance-distilled checkpoints (FLUX.1-dev), the guidance scale as an input embedding instead of running
classifier-free guidance. Shared by the sampler and the trainer's recompute, so both compute one function.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import FluxPipeline

from verl_omni.pipelines.flow_match_sde import TIMESTEP_SCALE


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as FLUX's token sequence (B, h/2 * w/2, 4C), as ``FluxPipeline`` packs them."""
    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for (h, w) latents."""
    return FluxPipeline._unpack_latents(tokens, height, width, vae_scale_factor=1)


def position_ids(text_length: int, height: int, width: int, device: torch.device, dtype: torch.dtype):
    """``(txt_ids (L, 3), img_ids (h/2 * w/2, 3))``: zeros for the text, (0, row, col) per image token;
    rebuilt from the shapes, so the conditioning bundle need not carry them."""
    txt_ids = torch.zeros(text_length, 3, device=device, dtype=dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, dtype)
    return txt_ids, img_ids


def has_guidance_embedding(transformer: torch.nn.Module) -> bool:
    """Whether the transformer takes the guidance scale as an input (FLUX.1-dev) or not (FLUX.1-schnell).

    Read from the diffusers config where there is one (the trainer's and the diffusers backend's model), else from
    the module itself: vllm-omni's ``FluxTransformer2DModel`` has no ``config`` but the same ``guidance_embeds``.
    """
    config = getattr(transformer, "config", None)
    return bool(config.guidance_embeds if config is not None else transformer.guidance_embeds)


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigmas: float | torch.Tensor,
    conditioning: Mapping[str, torch.Tensor],
    guidance_scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The FLUX transformer's velocity at unpacked ``latents`` (B, C, h, w) and noise level ``sigmas``; float32,
    same shape.

    The timestep is computed as ``FluxPipeline`` computes it (``sigma * 1000`` in float32, then ``/ 1000``), so
    ODE sampling matches the stock pipeline bit for bit. ``guidance_scale`` feeds the guidance embedding when
    the checkpoint has one (FLUX.1-dev) and is ignored otherwise (FLUX.1-schnell). ``dtype`` as in
    :func:`verl_omni.pipelines.sd3.conditioning.predict_velocity`.
    """
    batch, _, height, width = latents.shape
    sig = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    timestep = (sig.expand(batch) if sig.ndim == 0 else sig) * TIMESTEP_SCALE / TIMESTEP_SCALE
    dtype = dtype or next(transformer.parameters()).dtype
    enc = conditioning["prompt_embeds"]
    guidance = None
    if has_guidance_embedding(transformer):
        guidance = torch.full((batch,), guidance_scale, dtype=torch.float32, device=latents.device)
    txt_ids, img_ids = position_ids(enc.shape[1], height, width, latents.device, dtype)
    out = transformer(
        hidden_states=pack_latents(latents.to(dtype)),
        timestep=timestep,
        guidance=guidance,
        pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
        encoder_hidden_states=enc.to(dtype),
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0].float()
    return unpack_latents(out, height, width)
