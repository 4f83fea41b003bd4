"""Wan conditioning: UMT5 prompt encoding and the (classifier-free-guided) velocity of a Wan transformer on video
latents, shared by the sampler and the trainer's recompute, so both compute one function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from verl_omni.pipelines.flow_match_sde import TIMESTEP_SCALE
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks

CONDITIONING_FIELDS = ("prompt_embeds",)
"""Wan's conditioning of one text: ``prompt_embeds (L, D)``, the UMT5 sequence zero-padded after the prompt's tokens
(as ``WanPipeline`` pads it; the transformer takes no mask), float32 on the host. The CFG negative is a bundle of the
same field."""

EncodeFn = Callable[[list[str]], torch.Tensor]
"""A backend's text encoder on a list of texts: batched ``prompt_embeds (B, L, D)``."""


@torch.no_grad()
def encode_texts(encode: EncodeFn, texts: list[str], chunk_size: int | None) -> list[Conditioning]:
    """Run ``encode`` once over ``texts``; per-text float32 bundles on the host (a large prompt cache stays off the
    GPU). Batch-invariant: chunks of ``chunk_size`` texts, padded with empty prompts."""
    embeds = map_chunks(encode, [texts], chunk_size, fill="").float().cpu()
    return [{"prompt_embeds": embeds[i].clone()} for i in range(len(texts))]


def stack_encodings(encodings: Sequence[Conditioning], device: torch.device) -> Conditioning:
    """Per-text bundles as one batched bundle on ``device``."""
    return {name: torch.stack([e[name] for e in encodings]).to(device) for name in CONDITIONING_FIELDS}


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    sigmas: float | torch.Tensor,
    conditioning: Mapping[str, torch.Tensor],
    negative_conditioning: Mapping[str, torch.Tensor] | None = None,
    guidance_scale: float = 1.0,
    detach_uncond: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The Wan transformer's velocity at video ``latents`` (B, C, f, h, w) and noise level ``sigmas``; float32, same
    shape. With ``guidance_scale > 1``: ``v_neg + g * (v_pos - v_neg)``.

    As ``WanPipeline``: the timestep is ``sigma * 1000`` (float32) and the conditional and unconditional passes are
    two transformer calls (a video batch is large; CFG does not double it). ``detach_uncond`` runs the
    unconditional pass without autograd (the reference trains the conditional branch only; same forward values,
    and no activations kept for the negative). A Wan 2.2 ``expand_timesteps`` checkpoint (TI2V-5B) takes a
    per-token timestep, which text-to-video fills with one value: the same function as this per-sample one.
    ``dtype``: the compute dtype, as in :func:`verl_omni.pipelines.sd3.conditioning.predict_velocity`.
    """
    batch = latents.shape[0]
    sig = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    timestep = (sig.expand(batch) if sig.ndim == 0 else sig) * TIMESTEP_SCALE
    dtype = dtype or next(transformer.parameters()).dtype
    x = latents.to(dtype)

    def run(bundle: Mapping[str, torch.Tensor]) -> torch.Tensor:
        enc = bundle["prompt_embeds"].to(dtype)
        return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=enc, return_dict=False)[0]

    v = run(conditioning).float()
    if guidance_scale <= 1.0:
        return v
    if negative_conditioning is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative conditioning")
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_uncond):
        v_neg = run(negative_conditioning).float()
    return v_neg + guidance_scale * (v - v_neg)
