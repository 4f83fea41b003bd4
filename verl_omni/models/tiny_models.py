"""The tiny local models a recipe builds on first use, by name (``actor_rollout_ref.model.tiny``).

One per model family, each a real diffusers pipeline with random (or, for SD3, briefly pretrained) weights, saved
in the diffusers format and cached: a CPU run of any family needs no download. Names and directories are read
without importing torch (config checks run before it loads); the builder is imported only to build.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

TINY_MODEL_KEY = "actor_rollout_ref.model.tiny"


@dataclass(frozen=True)
class TinyModel:
    """Attributes:
    ensure: dotted path of ``ensure_*(cache_dir) -> Path``, which builds the model unless a current build exists.
    directory: the build's directory name under the cache (seed 0).
    """

    ensure: str
    directory: str


TINY_MODELS: dict[str, TinyModel] = {
    # pretrained on coloured scenes (~15 s on first use): the colour demo learns visibly in 80 steps
    "sd3": TinyModel("verl_omni.models.tiny_pretrain.ensure_pretrained_tiny_sd3", "tiny-sd3-color-seed0"),
    "flux": TinyModel("verl_omni.models.tiny_flux.ensure_tiny_flux", "tiny-flux-seed0"),
    "qwen_image": TinyModel("verl_omni.models.tiny_qwen_image.ensure_tiny_qwen_image", "tiny-qwen-image-seed0"),
    "wan": TinyModel("verl_omni.models.tiny_wan.ensure_tiny_wan", "tiny-wan-seed0"),  # text-to-video
}


def check_tiny_model(name: object) -> str:
    """``name`` if it names a tiny model; ``ValueError`` naming the key and the valid choices otherwise."""
    if name not in TINY_MODELS:
        raise ValueError(f"{TINY_MODEL_KEY}={name!r} is not a tiny model; valid choices: {', '.join(TINY_MODELS)}")
    return str(name)


def built_tiny_model(name: str, cache_dir: str | os.PathLike) -> Path | None:
    """The directory of tiny model ``name`` under ``cache_dir`` if a previous run built it, else None."""
    path = Path(cache_dir).expanduser() / TINY_MODELS[check_tiny_model(name)].directory
    return path if (path / "model_index.json").is_file() else None


def ensure_tiny_model(name: str, cache_dir: str | os.PathLike) -> Path:
    """Tiny model ``name``'s directory under ``cache_dir``, built first if it is missing or stale."""
    module, _, function = TINY_MODELS[check_tiny_model(name)].ensure.rpartition(".")
    return getattr(importlib.import_module(module), function)(cache_dir)
