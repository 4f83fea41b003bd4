"""Weak local pretraining of the tiny SD3 pipeline, so the CPU demo has something RL can improve.

The randomly initialised tiny model draws colour noise that barely depends on the prompt, and RL alone does not move
a colour reward on it (measured, 60 steps at lr 3e-2 or 3e-3: ``val/reward/mean`` 0.124 -> 0.124 / 0.122). The
pretrained variant keeps the tiny model's text encoders and transformer architecture and, in about 15 s on two
cores (one thread):

1. swaps in a hand-set VAE (:mod:`verl_omni.models.color_vae`): latents are 8x8-averaged colours, decoded exactly;
2. trains the transformer with flow matching (SD3's rectified-flow loss) on the latents of generated scenes
   (:mod:`verl_omni.models.color_scenes`) and their captions.

The captions name each scene's object, but its colour only half of the time (``color_agreement``; otherwise a colour
drawn at random): the model learns to draw one flat palette colour per image and follows the prompt's colour word in
about a third of its samples (measured, ODE). Raising that is what RL on ``geneval_color`` has to do; with captions
that never name the colour, RL could not undo what pretraining taught (ignore the colour word) in a demo's budget, and
with captions that always do, there is nothing left to learn.

Usage::

    python -m verl_omni.models.tiny_pretrain --out DIR [--seed S]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from verl_omni.models.color_scenes import COLORS, OBJECTS, caption, random_scenes
from verl_omni.models.color_vae import color_vae, encode_mean
from verl_omni.models.tiny_sd3 import (
    T5_MAX_LENGTH,
    TINY_SD3_HEIGHT,
    build_tiny_sd3_pipeline,
    ensure_built,
    save_pipeline_atomically,
    stamp_for,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

PRETRAIN_VERSION = 2  # bump when the recipe below changes in a way its options do not show


@dataclass(frozen=True)
class PretrainOptions:
    """The pretraining recipe; written to the stamp, so a cache built with other options is rebuilt."""

    size: int = TINY_SD3_HEIGHT
    transformer_steps: int = 600
    transformer_batch: int = 32
    transformer_lr: float = 3e-3
    num_latents: int = 2048  # scenes encoded once for the transformer's flow-matching steps
    # Probability that a caption names its scene's colour (otherwise a colour drawn at random): 0.5 leaves the
    # model following the colour word about a third of the time (measured), which RL then raises.
    color_agreement: float = 0.5
    time_shift: float = 1.0  # noise levels s = shift u / (1 + (shift - 1) u), u uniform: 1 = uniform


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: float reductions that do not depend on the core count, and no collapse when other
    processes load the cores (two OpenMP threads on two busy cores ran ~80x slower per step here, measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="Pretraining the tiny model (first use only)", disable=not enabled, mininterval=1.0)


@torch.no_grad()
def _encode_scenes(vae, opts: PretrainOptions, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Scaled latents ``(N, C, h, w)`` of ``num_latents`` scenes and their captions; sets the VAE's
    ``shift_factor`` / ``scaling_factor`` to the latents' mean and 1/std, as SD3's are."""
    scenes = random_scenes(opts.num_latents, opts.size, generator, color_agreement=opts.color_agreement)
    z = encode_mean(scenes.images)  # = vae.encode(...).latent_dist.mean, without running the convolutions
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (z - shift) * scale, scenes.captions


@torch.no_grad()
def _caption_embeddings(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Text conditioning of every caption, encoded as the rollout engine encodes prompts (each text once)."""
    texts = sorted({caption(c, o) for c in COLORS for o in OBJECTS} | set(captions))
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=False,
        max_sequence_length=T5_MAX_LENGTH,
    )
    return embeds, pooled, {t: i for i, t in enumerate(texts)}


def _train_transformer(pipe, latents, captions, opts: PretrainOptions, generator: torch.Generator, bar) -> None:
    """Rectified flow matching: ``x_s = (1 - s) x0 + s eps``, the transformer regresses ``eps - x0``."""
    embeds, pooled, index = _caption_embeddings(pipe, captions)
    rows = torch.tensor([index[c] for c in captions])
    transformer = pipe.transformer.train().requires_grad_(True)
    optim = torch.optim.AdamW(transformer.parameters(), lr=opts.transformer_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=opts.transformer_steps)
    for _ in range(opts.transformer_steps):
        pick = torch.randint(0, latents.shape[0], (opts.transformer_batch,), generator=generator)
        x0, text = latents[pick], rows[pick]
        u = torch.rand(opts.transformer_batch, generator=generator)
        s = (opts.time_shift * u / (1 + (opts.time_shift - 1) * u)).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=generator)
        pred = transformer(
            hidden_states=(1 - s) * x0 + s * eps,
            encoder_hidden_states=embeds[text],
            pooled_projections=pooled[text],
            timestep=s.flatten() * 1000.0,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred, eps - x0)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optim.step()
        schedule.step()
        bar.update(1)
        if bar.n % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    transformer.eval().requires_grad_(False)


def build_pretrained_tiny_sd3_pipeline(
    seed: int = 0, options: PretrainOptions | None = None, progress: bool = True
) -> StableDiffusion3Pipeline:
    """The tiny pipeline of ``seed``, weakly pretrained on generated scenes; a pure function of its arguments."""
    opts = options or PretrainOptions()
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**{**build_tiny_sd3_pipeline(seed).components, "vae": color_vae(opts.size)})
    generator = torch.Generator().manual_seed(seed)
    with _one_thread(), _progress(opts.transformer_steps, progress) as bar:
        latents, captions = _encode_scenes(pipe.vae, opts, generator)
        _train_transformer(pipe, latents, captions, opts, generator, bar)
    return pipe


def _stamp(seed: int, opts: PretrainOptions) -> dict:
    return stamp_for(seed, pretrain={"version": PRETRAIN_VERSION, **asdict(opts)})


def build_pretrained_tiny_sd3(
    out_dir: str | os.PathLike, seed: int = 0, options: PretrainOptions | None = None, progress: bool = True
) -> Path:
    """Pretrain and write the pipeline to ``out_dir`` atomically (see :func:`save_pipeline_atomically`)."""
    opts = options or PretrainOptions()
    pipe = build_pretrained_tiny_sd3_pipeline(seed, opts, progress=progress)
    return save_pipeline_atomically(pipe, out_dir, _stamp(seed, opts))


def ensure_pretrained_tiny_sd3(
    cache_dir: str | os.PathLike, seed: int = 0, options: PretrainOptions | None = None, progress: bool = True
) -> Path:
    """Return ``cache_dir/tiny-sd3-color-seed{seed}``, pretraining it only if it is missing or stale."""
    opts = options or PretrainOptions()
    out = Path(cache_dir).expanduser().resolve() / f"tiny-sd3-color-seed{seed}"
    return ensure_built(
        out,
        _stamp(seed, opts),
        lambda path: build_pretrained_tiny_sd3(path, seed=seed, options=opts, progress=progress),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the diffusers pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the pretraining data")
    args = parser.parse_args(argv)
    print(build_pretrained_tiny_sd3(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
