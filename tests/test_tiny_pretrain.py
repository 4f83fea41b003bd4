"""The pretrained tiny model of the CPU demo: generated scenes, the hand-set VAE, the cached weak pretraining."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from verl_omni.models.color_scenes import COLORS, OBJECT_SHAPES, caption, random_scenes
from verl_omni.models.color_vae import LATENT_FROM_RGB, color_vae, encode_mean
from verl_omni.models.palette import PALETTE
from verl_omni.models.tiny_pretrain import PretrainOptions, build_pretrained_tiny_sd3, ensure_pretrained_tiny_sd3
from verl_omni.models.tiny_sd3 import read_stamp
from verl_omni.rewards.color import GenEvalColorReward

FAST = PretrainOptions(transformer_steps=4, num_latents=64)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_scenes_are_deterministic_and_captions_follow_color_agreement():
    a = random_scenes(32, 64, torch.Generator().manual_seed(3), color_agreement=1.0)
    b = random_scenes(32, 64, torch.Generator().manual_seed(3), color_agreement=1.0)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (32, 3, 64, 64) and a.images.min() >= -1 and a.images.max() <= 1
    for text, color in zip(a.captions, a.colors.tolist(), strict=True):
        article, word, obj = text.split()
        assert word == COLORS[color] and obj in OBJECT_SHAPES and article == ("an" if word[0] in "aeiou" else "a")
    # The scene's colour covers the image, so a correct caption scores high under the colour reward.
    assert GenEvalColorReward()(_to_uint8(a.images), a.captions).min() > 0.8
    mixed = random_scenes(400, 16, torch.Generator().manual_seed(0), color_agreement=0.5)
    agree = sum(t.split()[1] == COLORS[c] for t, c in zip(mixed.captions, mixed.colors.tolist(), strict=True))
    assert 0.45 < agree / 400 < 0.65  # 0.5 + 0.5 / 8 in expectation


def test_caption_format():
    assert caption("red", "car") == "a red car" and caption("orange", "cup") == "an orange cup"


def test_color_vae_encodes_8x8_means_and_decodes_them_exactly():
    vae = color_vae()
    x = random_scenes(4, 64, torch.Generator().manual_seed(1)).images
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mean).sample
    assert torch.allclose(posterior.mean, encode_mean(x), atol=1e-4)
    assert posterior.std.max() < 1e-4  # a deterministic encoder
    blocks = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 8), scale_factor=8, mode="nearest")
    assert torch.allclose(decoded, blocks, atol=1e-4)
    # Every latent maps linearly to a colour: Q^T z, whatever the latent (in the output range).
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        out = vae.decode(z).sample
    expected = torch.einsum("kc,bkhw->bchw", LATENT_FROM_RGB, z)
    assert torch.allclose(out, torch.nn.functional.interpolate(expected, scale_factor=8), atol=1e-4)
    # No random weights survive: two builds are identical.
    other = color_vae()
    assert all(torch.equal(p, q) for p, q in zip(vae.state_dict().values(), other.state_dict().values(), strict=True))


def test_same_seed_same_files_and_ensure_reuses_or_rebuilds(tmp_path):
    first = build_pretrained_tiny_sd3(tmp_path / "a", seed=0, options=FAST, progress=False)
    again = build_pretrained_tiny_sd3(tmp_path / "b", seed=0, options=FAST, progress=False)
    assert _digest(first) == _digest(again)
    assert read_stamp(first)["pretrain"]["transformer_steps"] == FAST.transformer_steps

    cached = ensure_pretrained_tiny_sd3(tmp_path / "cache", seed=0, options=FAST, progress=False)
    mtime = (cached / "model_index.json").stat().st_mtime_ns
    assert ensure_pretrained_tiny_sd3(tmp_path / "cache", seed=0, options=FAST, progress=False) == cached
    assert (cached / "model_index.json").stat().st_mtime_ns == mtime  # reused
    changed = replace(FAST, transformer_steps=5)
    assert ensure_pretrained_tiny_sd3(tmp_path / "cache", seed=0, options=changed, progress=False) == cached
    assert read_stamp(cached)["pretrain"]["transformer_steps"] == 5  # stale options: rebuilt in place
    (cached / "tiny_sd3.json").unlink()  # an interrupted build
    ensure_pretrained_tiny_sd3(tmp_path / "cache", seed=0, options=changed, progress=False)
    assert read_stamp(cached) is not None


@pytest.fixture(scope="module")
def default_model(verl_omni_cache) -> Path:
    """The demo's model, with the default options (built once per session, in the shared cache)."""
    return ensure_pretrained_tiny_sd3(verl_omni_cache / "tiny_sd3", seed=0, progress=False)


def test_default_pretraining_draws_flat_colours_and_follows_the_colour_word_only_weakly(default_model, monkeypatch):
    """What makes the demo learn: clean palette colours (so the reward can tell), and colour adherence well below
    what RL reaches (about 0.35 here, measured; the recipe's RL run takes it to about 0.85)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(default_model)
    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(c, o) for c in COLORS for o in ("dog", "car", "cup", "kite")]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(
        prompts,
        num_inference_steps=8,
        guidance_scale=1.0,
        max_sequence_length=16,
        output_type="pt",
        generator=generators,
    ).images
    images = (images * 255).round().clamp(0, 255).to(torch.uint8)
    reward = GenEvalColorReward()
    named = reward(images, prompts).mean().item()
    purity = torch.stack([reward(images, [f"a {c} x"] * len(prompts)) for c in PALETTE]).max(0).values.mean().item()
    assert purity > 0.75, purity  # each image is mostly one palette colour
    assert 0.15 < named < 0.6, named  # the colour word is followed, but weakly
