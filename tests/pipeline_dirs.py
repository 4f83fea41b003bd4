"""Diffusers pipeline directories made of JSON configs only (no weights), for the config checks that read them."""

from __future__ import annotations

import json
from pathlib import Path

_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")


def write_json_pipeline(path: Path) -> Path:
    """An SD3 pipeline directory whose VAE (scale factor 8) and transformer (patch size 2) configs say images must
    be multiples of 16 pixels: enough for the image-size check, which must not need torch or weights."""
    path.mkdir(parents=True)
    index = {"_class_name": "StableDiffusion3Pipeline", **{name: ["diffusers", "X"] for name in _COMPONENTS}}
    (path / "model_index.json").write_text(json.dumps(index))
    for name in _COMPONENTS:
        (path / name).mkdir()
    (path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8], "latent_channels": 4}))
    (path / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2, "sample_size": 16}))
    return path
