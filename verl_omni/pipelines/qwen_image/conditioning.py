"""Qwen-Image conditioning: prompt encoding and the guided velocity, shared by the sampler and the trainer.

``QwenImagePipeline`` pads each batch's prompt embeddings to its longest prompt. Here every text is padded to one
fixed length (``max_sequence_length`` tokens after the template) with its mask: a prompt's embedding is then an
entry of the group's conditioning table that stacks with any other, and every text-encoder and transformer call
has one shape, so a sample's numbers do not depend on its batch-mates (batch-invariant chunking). Padding is
masked out of the transformer's attention and zeroed, as the stock pipeline zeroes it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import QwenImagePipeline

from verl_omni.pipelines.flow_match_sde import TIMESTEP_SCALE

CONDITIONING_FIELDS = ("prompt_embeds", "prompt_embeds_mask")
"""Qwen-Image's conditioning of one text: ``prompt_embeds (L, D)`` float32 and ``prompt_embeds_mask (L,)`` int64
(1: a token of the text, 0: padding), on the host; the CFG negative is a bundle of the same fields."""


@torch.no_grad()
def encode_prompts(
    pipe: Any, texts: list[str], max_sequence_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds (B, L, D), mask (B, L))`` of ``texts`` with L = ``max_sequence_length``, as
    ``QwenImagePipeline.encode_prompt`` computes them but padded to L instead of the batch's longest prompt.

    Each text goes through the pipeline's chat template; the template's system prefix
    (``prompt_template_encode_start_idx`` tokens) is dropped and the next L tokens are kept (a longer prompt is
    cut, as ``encode_prompt`` cuts at ``max_sequence_length``). The tokenizer pads to the fixed length on the
    right, so the text encoder runs at one shape too.
    """
    drop = pipe.prompt_template_encode_start_idx
    tokens = pipe.tokenizer(
        [pipe.prompt_template_encode.format(text) for text in texts],
        max_length=drop + max_sequence_length,
        padding="max_length",
        truncation=True,
        padding_side="right",
        return_tensors="pt",
    ).to(device)
    hidden = pipe.text_encoder(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
    ).hidden_states[-1]
    mask = tokens.attention_mask[:, drop:].long()
    return hidden[:, drop:] * mask[..., None].to(hidden.dtype), mask


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as Qwen-Image's token sequence (B, h/2 * w/2, 4C), as ``QwenImagePipeline`` packs them."""
    batch, channels, height, width = latents.shape
    return QwenImagePipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for (h, w) latents (the pipeline's unpacking, without its frame axis)."""
    return QwenImagePipeline._unpack_latents(tokens, height, width, vae_scale_factor=1)[:, :, 0]


@functools.cache
def _takes_text_lengths(transformer_type: type) -> bool:
    return "txt_seq_lens" in inspect.signature(transformer_type.forward).parameters


def text_length_kwargs(transformer: torch.nn.Module, text_length: int, batch: int) -> dict[str, list[int]]:
    """``{"txt_seq_lens": [L] * B}`` for vllm-omni's ``QwenImageTransformer2DModel``, which sizes the text RoPE from
    it (``max(txt_seq_lens)``) and fails without it; ``{}`` for diffusers', which reads L from the embeddings.
    Every text is padded to L here (masked), so both rotate the same L text positions."""
    return {"txt_seq_lens": [text_length] * batch} if _takes_text_lengths(type(transformer)) else {}


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
    """The Qwen-Image transformer's velocity at unpacked ``latents`` (B, C, h, w); float32, same shape.

    ``guidance_scale`` is ``QwenImagePipeline``'s ``true_cfg_scale``: above 1 the negative runs as a second call
    (as the stock pipeline runs it) and ``v_neg + g (v_pos - v_neg)`` is rescaled per token to the norm of
    ``v_pos``, Qwen-Image's guidance. ``detach_uncond`` stops the gradient through the negative branch (the
    rescale still back-propagates through ``v_pos``). The timestep is ``sigma * 1000 / 1000`` in float32 as the
    pipeline computes it, so ODE sampling matches it bit for bit. ``dtype`` as in
    :func:`verl_omni.pipelines.sd3.conditioning.predict_velocity`.
    """
    batch, _, height, width = latents.shape
    sig = torch.as_tensor(sigmas, dtype=torch.float32, device=latents.device)
    timestep = (sig.expand(batch) if sig.ndim == 0 else sig) * TIMESTEP_SCALE / TIMESTEP_SCALE
    dtype = dtype or next(transformer.parameters()).dtype
    hidden = pack_latents(latents.to(dtype))
    img_shapes = [[(1, height // 2, width // 2)]] * batch

    def run(cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        embeds = cond["prompt_embeds"]
        return transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=cond["prompt_embeds_mask"],
            img_shapes=img_shapes,
            return_dict=False,
            **text_length_kwargs(transformer, embeds.shape[1], batch),
        )[0].float()

    out = run(conditioning)
    if guidance_scale > 1.0:
        if negative_conditioning is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative conditioning")
        negative = run(negative_conditioning)
        if detach_uncond:
            negative = negative.detach()
        combined = negative + guidance_scale * (out - negative)
        out = combined * (torch.norm(out, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    return unpack_latents(out, height, width)
