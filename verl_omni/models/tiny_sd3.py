"""A tiny, randomly initialised Stable Diffusion 3 pipeline built locally (nothing is downloaded).

CPU tests and the CPU recipe need a model that takes the same code path as a real SD3/SD3.5
checkpoint (``DiffusionPipeline.from_pretrained(dir)``, SD3 transformer, KL VAE, flow-matching
scheduler, two CLIP text encoders with projection and a T5 encoder) but runs a 10-step batch of 8
64x64 images in well under a second on one core. All three text encoders are kept (one layer or two
each) because diffusers' ``from_pretrained`` requires every SD3 component unless the caller passes
``text_encoder_3=None``; a real checkpoint must load with the same call.

The tokenizer vocabularies are generated here. CLIP: the 256 byte symbols of byte-level BPE (each
also as an end-of-word symbol) plus merges of every pair of lowercase letters, so a word takes about
half its length in tokens. T5: a unigram vocabulary of printable characters and lowercase letter
pairs. The T5 tokenizer's ``model_max_length`` (16) is what the rollout engine uses as its default
``max_sequence_length``.

Usage::

    python -m verl_omni.models.tiny_sd3 --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import string
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

TINY_SD3_HEIGHT = 64
TINY_SD3_WIDTH = 64
TOKENIZER_MAX_LENGTH = 32
T5_MAX_LENGTH = 16
# Written next to the pipeline so ensure_tiny_sd3 can tell a finished build (and its recipe) from a partial one.
_STAMP_FILE = "tiny_sd3.json"
_STAMP_VERSION = 1

_CLIP_HIDDEN = 32
_CLIP_PROJECTION = 32
_LATENT_CHANNELS = 4
_JOINT_DIM = 2 * _CLIP_HIDDEN  # the two CLIP hidden states concatenated; also T5's width


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (the base alphabet of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A deterministic byte-level BPE vocabulary and merge list for the tiny CLIP tokenizers."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    letters = string.ascii_lowercase
    for a in letters:
        for b in letters:
            merges.append((a, b))
            merges.append((a, b + "</w>"))
            tokens.extend([a + b, a + b + "</w>"])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """A deterministic unigram vocabulary (piece, log-score) for the tiny T5 tokenizer."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    singles = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [(c, -3.0) for c in singles]
    pieces += [("\u2581" + c, -2.5) for c in singles]
    pieces += [(a + b, -4.0) for a in string.ascii_lowercase for b in string.ascii_lowercase]
    return pieces


def _tiny_t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _tiny_t5_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_JOINT_DIM,
        d_kv=16,
        d_ff=2 * _JOINT_DIM,
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
    return T5EncoderModel(config).eval()


def _tiny_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)


def _tiny_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=2 * _CLIP_HIDDEN,
        num_hidden_layers=2,  # SD3 reads hidden_states[-2]: at least two layers
        num_attention_heads=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=_CLIP_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """Build the tiny ``StableDiffusion3Pipeline`` in memory (weights drawn from ``seed``)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer = _tiny_tokenizer()
    tokenizer_2 = _tiny_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer, seed)
    text_encoder_2 = _tiny_text_encoder(tokenizer_2, seed + 1)
    tokenizer_3 = _tiny_t5_tokenizer()
    text_encoder_3 = _tiny_t5_encoder(tokenizer_3, seed + 4)

    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=TINY_SD3_HEIGHT // 8,
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_JOINT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _CLIP_PROJECTION,
        pos_embed_max_size=32,  # up to 512x512 images
    ).eval()

    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four blocks: 8x downsampling, as in SD3
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=TINY_SD3_HEIGHT,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def stamp_for(seed: int, **extra: object) -> dict:
    """The stamp a finished build writes: the build recipe's version, its seed and any ``extra`` options."""
    return {"version": _STAMP_VERSION, "seed": seed, **extra}


def read_stamp(model_dir: str | os.PathLike) -> dict | None:
    """The stamp of a finished build in ``model_dir``, or None (missing, partial or unreadable)."""
    try:
        return json.loads((Path(model_dir) / _STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _quiet_saving() -> Iterator[None]:
    """Hide transformers' per-encoder "Writing model shards" bars: three bars for three one-file encoders."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def save_pipeline_atomically(pipe: StableDiffusion3Pipeline, out_dir: str | os.PathLike, stamp: dict) -> Path:
    """Write ``pipe`` to ``out_dir`` in the diffusers format with ``stamp``, and return the resolved path.

    The directory is written atomically (a temporary sibling renamed into place) so a concurrent
    reader never sees a half-written model. An existing ``out_dir`` is replaced.
    """
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with _quiet_saving():
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / _STAMP_FILE).write_text(json.dumps(stamp))
        if out.exists():
            shutil.rmtree(out)
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / _STAMP_FILE).is_file():  # not a concurrent builder that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def build_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny random pipeline to ``out_dir`` (atomically, see :func:`save_pipeline_atomically`)."""
    return save_pipeline_atomically(build_tiny_sd3_pipeline(seed), out_dir, stamp_for(seed))


def ensure_built(out: Path, stamp: dict, build: Callable[[Path], Path]) -> Path:
    """``out`` if it holds a build stamped ``stamp``; else ``build(out)`` (missing or stale: another seed, recipe)."""
    return out if read_stamp(out) == stamp else build(out)


def ensure_tiny_sd3(cache_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``cache_dir/tiny-sd3-seed{seed}``, building it only if it is missing or stale."""
    out = Path(cache_dir).expanduser().resolve() / f"tiny-sd3-seed{seed}"
    return ensure_built(out, stamp_for(seed), lambda path: build_tiny_sd3(path, seed=seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (same seed, same files)")
    args = parser.parse_args(argv)
    print(build_tiny_sd3(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
