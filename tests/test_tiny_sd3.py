"""The tiny SD3 pipeline: built locally, deterministic per seed, loadable the way a real checkpoint is."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from verl_omni.models.tiny_sd3 import TOKENIZER_MAX_LENGTH, build_tiny_sd3, ensure_tiny_sd3, main


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny") / "sd3", seed=0)


def test_same_seed_writes_identical_files_and_other_seed_differs(tiny_dir, tmp_path):
    again = build_tiny_sd3(tmp_path / "again", seed=0)
    other = build_tiny_sd3(tmp_path / "other", seed=1)
    assert _digest(again) == _digest(tiny_dir)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert _digest(other)[weights] != _digest(tiny_dir)[weights]
    assert not list(tmp_path.glob(".again.*")), "temporary build directory left behind"


def test_loads_with_diffusion_pipeline_from_pretrained_offline(tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import (
        AutoencoderKL,
        DiffusionPipeline,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = DiffusionPipeline.from_pretrained(tiny_dir)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    n_params = sum(
        p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    )
    assert n_params < 1_000_000  # tiny: a 10-step batch of 8 images takes milliseconds per step on one core

    # Locally generated vocabularies tokenize and round-trip ordinary prompts.
    ids = pipe.tokenizer("A photo of a cat").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) < TOKENIZER_MAX_LENGTH
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert pipe.tokenizer_3.decode(pipe.tokenizer_3("a photo").input_ids, skip_special_tokens=True) == "a photo"


def test_generation_is_deterministic_per_seed(tiny_dir):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)

    def run(seed: int):
        return pipe(
            ["a photo of a cat"] * 2,
            num_inference_steps=4,
            height=64,
            width=64,
            guidance_scale=4.5,
            max_sequence_length=16,
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        ).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.std() > 0  # not a constant image


def test_ensure_builds_once_and_rebuilds_a_partial_directory(tmp_path):
    first = ensure_tiny_sd3(tmp_path, seed=3)
    stamp = first / "tiny_sd3.json"
    mtime = (first / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_sd3(tmp_path, seed=3) == first
    assert (first / "model_index.json").stat().st_mtime_ns == mtime  # reused, not rebuilt

    stamp.unlink()  # a build interrupted before its stamp was written
    again = ensure_tiny_sd3(tmp_path, seed=3)
    assert again == first and stamp.is_file()
    assert ensure_tiny_sd3(tmp_path, seed=4) != first


def test_cli_writes_a_loadable_pipeline(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--seed", "2"])
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == (tmp_path / "cli").resolve()
    assert (out / "model_index.json").is_file() and (out / "transformer" / "config.json").is_file()
