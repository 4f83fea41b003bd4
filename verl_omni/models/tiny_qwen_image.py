"""A tiny, randomly initialised Qwen-Image pipeline built locally (nothing is downloaded).

CPU tests and a CPU recipe run need a model that takes the same code path as the real Qwen-Image checkpoint
(``DiffusionPipeline.from_pretrained(dir)`` -> ``QwenImagePipeline``: a Qwen2.5-VL text encoder read through the
pipeline's chat template, a ``QwenImageTransformer2DModel`` reading 2x2-packed latents with a text mask, the
causal 3-D ``AutoencoderKLQwenImage`` and a flow-matching scheduler with dynamic and terminal shift) but runs a
64x64 batch in a fraction of a second on one core.

The byte-level BPE tokenizer is generated here (``Qwen2Tokenizer``, Qwen's special tokens): the 256 byte symbols,
merges of lowercase letter pairs, and whole-word merges for the words of ``QwenImagePipeline``'s prompt template,
so the template's system prefix is 34 tokens as with the real tokenizer: the pipeline drops exactly that many
(``prompt_template_encode_start_idx``) and keeps the user's text.

Usage::

    python -m verl_omni.models.tiny_qwen_image --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from verl_omni.models.tiny_sd3 import _bytes_to_unicode, ensure_built, save_pipeline_atomically, stamp_for

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline

TINY_QWEN_IMAGE_HEIGHT = 64
TINY_QWEN_IMAGE_WIDTH = 64
TINY_QWEN_IMAGE_MAX_SEQUENCE_LENGTH = 32  # prompt tokens kept after the template: the tiny recipe's padded length
_FAMILY = "qwen_image"  # in the stamp: another family's build in the same directory is stale
_TEXT_HIDDEN = 32  # the transformer's joint_attention_dim (Qwen2.5-VL-7B: 3584)
_LATENT_CHANNELS = 16  # the VAE's z_dim; the transformer reads 2x2 patches of it: 64 channels
_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The words of QwenImagePipeline.prompt_template_encode as it spells them (read for their spelling only): each is
# merged into one token, with its leading space where it follows one
_TEMPLATE_WORDS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background:\nuser\nassistant"
)


def tiny_qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic byte-level BPE vocabulary and merge list: template words first (so they merge whole), then
    lowercase letter pairs (a word of other text takes about half its length in tokens)."""
    space = _bytes_to_unicode()[ord(" ")]  # "Ġ": byte-level BPE's leading space
    tokens = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    seen = set(tokens)

    def merge(a: str, b: str) -> None:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
            merges.append((a, b))

    words = [w.replace(" ", space) for w in re.findall(r" ?[A-Za-z]+", _TEMPLATE_WORDS)]
    # words after a space first: every merge of theirs starts with "Ġ", so a bare word's merges cannot split them
    for word in sorted(words, key=lambda w: not w.startswith(space)):
        for k in range(2, len(word) + 1):
            merge(word[: k - 1], word[k - 1])
    for a in string.ascii_lowercase:
        merge(space, a)
        for b in string.ascii_lowercase:
            merge(a, b)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _tiny_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = tiny_qwen_vocab()
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        padding_side="right",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(_SPECIAL_TOKENS[1:])})
    return tokenizer


def _tiny_text_encoder(tokenizer, seed: int):
    """A one-layer Qwen2.5-VL (its vision tower too: the checkpoint class loads both; text prompts use only the
    language model, whose last hidden state the pipeline reads)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": 2 * _TEXT_HIDDEN,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 256,
            # multimodal RoPE over (time, height, width): sections sum to head_dim / 2
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": _TEXT_HIDDEN,
            "fullatt_block_indexes": [0],
        },
        # the image/video placeholder ids: past the tiny vocabulary, never produced by a text prompt
        image_token_id=len(tokenizer) + 1,
        video_token_id=len(tokenizer) + 2,
        vision_start_token_id=len(tokenizer) + 3,
        vision_end_token_id=len(tokenizer) + 4,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Build the tiny ``QwenImagePipeline`` in memory (weights drawn from ``seed``)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = _tiny_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer, seed)

    torch.manual_seed(seed + 2)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,  # 2x2 packed latents: 4 x 16 = 64 input channels
        in_channels=4 * _LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    ).eval()

    torch.manual_seed(seed + 3)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=_LATENT_CHANNELS,
        dim_mult=[1, 1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # three downsamplings: 8x, as Qwen-Image's VAE
    ).eval()

    # dynamic (resolution-dependent) shift with a terminal sigma, as Qwen-Image's scheduler config
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_tiny_qwen_image(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random Qwen-Image pipeline to ``out_dir`` (atomically, replacing what is there)."""
    return save_pipeline_atomically(build_tiny_qwen_image_pipeline(seed), out_dir, stamp_for(seed, family=_FAMILY))


def ensure_tiny_qwen_image(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``cache_dir/tiny-qwen-image-seed{seed}``, building it only if it is missing or stale."""
    out = Path(cache_dir).expanduser().resolve() / f"tiny-qwen-image-seed{seed}"
    return ensure_built(out, stamp_for(seed, family=_FAMILY), lambda path: build_tiny_qwen_image(path, seed=seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same files)")
    args = parser.parse_args(argv)
    print(build_tiny_qwen_image(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
