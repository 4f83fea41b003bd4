"""SD3 conditioning: prompt encoding and the classifier-free-guided velocity, shared by every backend and the trainer.

A backend supplies the text-encoding call of its own loaded pipeline (diffusers' ``encode_prompt`` or
vllm-omni's); chunking, the host-side per-text encodings and the CFG combination are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from verl_omni.pipelines.flow_match_sde import TIMESTEP_SCALE
from verl_omni.protocol import Conditioning
from verl_omni.utils.batch_invariant import map_chunks

CONDITIONING_FIELDS = ("prompt_embeds", "pooled_prompt_embeds")
"""SD3's conditioning of one text: ``prompt_embeds (L, D)`` (CLIP and T5 joint sequence) and
``pooled_prompt_embeds (P,)``, float32 on the host; the CFG negative is a bundle of the same fields."""

EncodeFn = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]
"""A backend's text encoders on a list of texts: batched ``(embeds (B, L, D), pooled (B, P))``."""


@torch.no_grad()
def encode_texts(encode: EncodeFn, texts: list[str], chunk_size: int | None) -> list[Conditioning]:
    """Run ``encode`` once over ``texts``; per-text float32 conditioning bundles on the host.

    Host memory keeps a large prompt cache off the GPU (an SD3.5 entry is about 5.5 MB in float32); a batch
    moves its few rows to the device. Batch-invariant: chunks of ``chunk_size`` texts, padded with empty prompts.
    """
    embeds, pooled = map_chunks(encode, [texts], chunk_size, fill="")
    embeds, pooled = embeds.float().cpu(), pooled.float().cpu()
    return [
        dict(zip(CONDITIONING_FIELDS, (embeds[i].clone(), pooled[i].clone()), strict=True)) for i in range(len(texts))
    ]


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
    """The transformer's velocity at ``(latents, sigma)``, with classifier-free guidance when ``guidance_scale > 1``.

    CFG runs the negative and positive conditioning in one batch (negative first, as diffusers) and
    combines ``v_neg + g * (v_pos - v_neg)``. ``detach_uncond`` stops the gradient through the negative
    (unconditional) branch, as the reference trainer does, so only ``g * dv_pos`` is trained; the forward
    values are the same either way. Returns float32 (B, C, h, w).

    ``dtype`` is the compute dtype the latents and text conditioning are cast to (None: the transformer's
    parameter dtype, right for a model loaded in its compute dtype, as the rollout's is). The timestep stays
    float32 either way: the SD3 transformer builds its sinusoidal embedding from it in float32, so a trainer
    whose mixed precision casts it to bf16 (``936`` for ``937.5``) would compute another function.
    """
    batch = latents.shape[0]
    sig = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    timestep = (sig.expand(batch) if sig.ndim == 0 else sig) * TIMESTEP_SCALE
    dtype = dtype or next(transformer.parameters()).dtype
    x = latents.to(dtype)
    do_cfg = guidance_scale > 1.0
    enc, pooled = (conditioning[name] for name in CONDITIONING_FIELDS)
    if do_cfg:
        if negative_conditioning is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative conditioning")
        x = torch.cat([x, x])
        timestep = torch.cat([timestep, timestep])
        enc = torch.cat([negative_conditioning["prompt_embeds"], enc])
        pooled = torch.cat([negative_conditioning["pooled_prompt_embeds"], pooled])
    out = transformer(
        hidden_states=x,
        timestep=timestep,
        encoder_hidden_states=enc.to(dtype),
        pooled_projections=pooled.to(dtype),
        return_dict=False,
    )[0].float()
    if do_cfg:
        v_neg, v_pos = out.chunk(2)
        if detach_uncond:
            v_neg = v_neg.detach()
        out = v_neg + guidance_scale * (v_pos - v_neg)
    return out
