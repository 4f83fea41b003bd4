"""A tiny, randomly initialised Wan 2.1 text-to-video pipeline built locally (nothing is downloaded).

CPU tests and a CPU recipe run need a model that takes the same code path as a real Wan2.1-T2V checkpoint
(``DiffusionPipeline.from_pretrained(dir)`` -> ``WanPipeline``: a UMT5 text encoder, a ``WanTransformer3DModel``
with 1x2x2 patches, the causal 3-D ``AutoencoderKLWan`` (8x spatial, 4x temporal compression: a video of
``4k + 1`` frames has ``k + 1`` latent frames) and a flow-matching scheduler) but samples a 2-step batch of 5-frame
32x32 videos in a fraction of a second on one core. The tokenizer is the tiny SD3's T5 tokenizer (generated
locally, see :mod:`verl_omni.models.tiny_sd3`), as are the atomic save and the build stamp.

The scheduler is ``FlowMatchEulerDiscreteScheduler`` with Wan's ``shift=3.0`` (the shift Wan uses at 480p): its
ODE step is the Euler step the FlowGRPO sampler takes, so ``noise_level=0`` reproduces the stock ``WanPipeline``.
The published checkpoints ship a ``UniPCMultistepScheduler``; the sampler reads its flow sigmas the same way.

Usage::

    python -m verl_omni.models.tiny_wan --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from verl_omni.models.tiny_sd3 import _tiny_t5_tokenizer, ensure_built, save_pipeline_atomically, stamp_for

if TYPE_CHECKING:
    from diffusers import WanPipeline

TINY_WAN_HEIGHT = 32
TINY_WAN_WIDTH = 32
TINY_WAN_NUM_FRAMES = 5  # 4k + 1 frames: 2 latent frames
_FAMILY = "wan"  # in the stamp: another family's build in the same directory is stale for Wan
_TEXT_WIDTH = 32  # UMT5 d_model: the transformer's text_dim
_LATENT_CHANNELS = 16  # Wan 2.1's VAE z_dim


def _tiny_umt5_encoder(tokenizer, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=_TEXT_WIDTH,
        d_kv=16,
        d_ff=2 * _TEXT_WIDTH,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def build_tiny_wan_pipeline(seed: int = 0) -> WanPipeline:
    """Build the tiny ``WanPipeline`` in memory (weights drawn from ``seed``)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _tiny_t5_tokenizer()
    text_encoder = _tiny_umt5_encoder(tokenizer, seed)

    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,  # rotary split over (frames, rows, cols): 8 + 4 + 4
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        text_dim=_TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=64,
        num_layers=1,
        rope_max_seq_len=64,
    ).eval()

    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=_LATENT_CHANNELS,
        dim_mult=[1, 2, 2, 2],  # three downsamplings: 8x spatial, as in Wan 2.1
        num_res_blocks=0,  # the decoder still has one residual block per level (measured: 2.3x faster than 1)
        temperal_downsample=[False, True, True],  # two of them in time: 4x temporal
        latents_mean=[0.0] * _LATENT_CHANNELS,
        latents_std=[1.0] * _LATENT_CHANNELS,
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
    )


def build_tiny_wan(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random Wan pipeline to ``out_dir`` (atomically, replacing what is there)."""
    return save_pipeline_atomically(build_tiny_wan_pipeline(seed), out_dir, stamp_for(seed, family=_FAMILY))


def ensure_tiny_wan(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``cache_dir/tiny-wan-seed{seed}``, building it only if it is missing or stale."""
    out = Path(cache_dir).expanduser().resolve() / f"tiny-wan-seed{seed}"
    return ensure_built(out, stamp_for(seed, family=_FAMILY), lambda path: build_tiny_wan(path, seed=seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same files)")
    args = parser.parse_args(argv)
    print(build_tiny_wan(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
