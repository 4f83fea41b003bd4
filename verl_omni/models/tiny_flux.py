"""A tiny, randomly initialised FLUX.1 pipeline built locally (nothing is downloaded).

CPU tests and a CPU recipe run need a model that takes the same code path as a real FLUX.1-dev checkpoint
(``DiffusionPipeline.from_pretrained(dir)`` -> ``FluxPipeline``: a CLIP text encoder for the pooled embedding,
a T5 encoder for the sequence, a ``FluxTransformer2DModel`` with an embedded guidance scale, a 16-channel KL VAE
whose latents the transformer reads packed 2x2, and a flow-matching scheduler with FLUX's resolution-dependent
shift) but runs a 64x64 batch in a fraction of a second on one core. The tokenizers are the tiny SD3's
(generated locally, see :mod:`verl_omni.models.tiny_sd3`), as are the atomic save and the build stamp.

Usage::

    python -m verl_omni.models.tiny_flux --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from verl_omni.models.tiny_sd3 import (
    TOKENIZER_MAX_LENGTH,
    _tiny_t5_encoder,
    _tiny_t5_tokenizer,
    _tiny_tokenizer,
    ensure_built,
    save_pipeline_atomically,
    stamp_for,
)

if TYPE_CHECKING:
    from diffusers import FluxPipeline

TINY_FLUX_HEIGHT = 64
TINY_FLUX_WIDTH = 64
_FAMILY = "flux"  # in the stamp: a tiny SD3 build in the same directory is stale for FLUX
_CLIP_HIDDEN = 32
_T5_WIDTH = 64  # the tiny SD3's T5 width (its joint attention dim)
_LATENT_CHANNELS = 16  # FLUX's VAE; the transformer reads 2x2 patches of it: 64 channels


def _tiny_clip_encoder(tokenizer, seed: int):
    """FLUX reads the pooled output of a plain ``CLIPTextModel`` (no projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Build the tiny ``FluxPipeline`` in memory (weights drawn from ``seed``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = _tiny_tokenizer()
    text_encoder = _tiny_clip_encoder(tokenizer, seed)
    tokenizer_2 = _tiny_t5_tokenizer()
    text_encoder_2 = _tiny_t5_encoder(tokenizer_2, seed + 1)

    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        pooled_projection_dim=_CLIP_HIDDEN,
        guidance_embeds=True,  # FLUX.1-dev: guidance-distilled, the scale is an input
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four blocks: 8x downsampling, as in FLUX
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=TINY_FLUX_HEIGHT,
        scaling_factor=0.3611,  # FLUX.1's VAE
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()

    # FLUX.1-dev's scheduler config: the shift grows with the image's token count
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_flux(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random FLUX pipeline to ``out_dir`` (atomically, replacing what is there)."""
    return save_pipeline_atomically(build_tiny_flux_pipeline(seed), out_dir, stamp_for(seed, family=_FAMILY))


def ensure_tiny_flux(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``cache_dir/tiny-flux-seed{seed}``, building it only if it is missing or stale."""
    out = Path(cache_dir).expanduser().resolve() / f"tiny-flux-seed{seed}"
    return ensure_built(out, stamp_for(seed, family=_FAMILY), lambda path: build_tiny_flux(path, seed=seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same files)")
    args = parser.parse_args(argv)
    print(build_tiny_flux(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
