"""What a rollout backend needs to know about a diffusers-format model directory, read from its JSON configs.

Reading ``model_index.json`` and the component configs (no weights, no torch) lets the replica reject
a wrong model path, a model the backend has no pipeline for, or an image size the VAE cannot take before
any Ray actor starts. Both backends load diffusers-format checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_omni.pipelines.registry import MODEL_PIPELINES, adapter_path

_REQUIRED_COMPONENTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")
_SD3_T5_DEFAULT_MAX_SEQUENCE_LENGTH = 256


@dataclass(frozen=True)
class ModelSpec:
    """Static facts of a diffusers pipeline directory that bound valid requests."""

    path: str
    pipeline_class: str
    vae_scale_factor: int
    patch_size: int
    latent_channels: int
    default_height: int
    default_width: int
    max_latent_size: int | None
    has_t5: bool
    t5_max_length: int | None
    # video families (a causal 3-D VAE): frames per latent frame, and the pipeline's default frame count
    temporal_scale_factor: int | None = None
    default_num_frames: int | None = None

    @property
    def is_video(self) -> bool:
        return self.temporal_scale_factor is not None

    def latent_shape(self, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """One sample's (unpacked) latents: ``(C, h, w)`` for an image of ``height`` x ``width`` pixels,
        ``(C, f, h, w)`` for a video of ``num_frames`` frames (the causal VAE keeps the first frame, compresses the
        rest)."""
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        if num_frames is None:
            return (self.latent_channels, h, w)
        return (self.latent_channels, (num_frames - 1) // self.temporal_scale_factor + 1, h, w)

    def check_num_frames(self, name: str, value: Any) -> int | None:
        """Return ``value`` if the VAE takes it as ``name`` (a frame count; None for an image family), else raise
        naming the valid choices: a causal video VAE takes ``k * temporal_scale_factor + 1`` frames."""
        if not self.is_video:
            if value is not None:
                raise ValueError(
                    f"{name}={value!r}: a {self.pipeline_class} checkpoint generates images; valid choices: null"
                )
            return None
        t = self.temporal_scale_factor
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (value - 1) % t:
            examples = ", ".join(str(k * t + 1) for k in range(5))
            raise ValueError(
                f"{name}={value!r}: the {self.pipeline_class} VAE compresses time {t}x and keeps the first frame; "
                f"valid choices: {t}k + 1 frames ({examples}, ...)"
            )
        return value

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (VAE downsampling times transformer patch)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def max_image_size(self) -> int | None:
        """Largest height/width the transformer's positional embedding covers, in pixels."""
        return None if self.max_latent_size is None else self.max_latent_size * self.vae_scale_factor

    def default_max_sequence_length(self) -> int:
        """T5 tokens when the config leaves ``max_sequence_length`` null."""
        if self.t5_max_length is None:
            return _SD3_T5_DEFAULT_MAX_SEQUENCE_LENGTH
        return min(self.t5_max_length, _SD3_T5_DEFAULT_MAX_SEQUENCE_LENGTH)

    def check_image_size(self, name: str, value: Any) -> int:
        """Return ``value`` if the VAE and transformer accept it as ``name`` (height/width), else raise."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer number of pixels")
        if value % self.size_multiple:
            raise ValueError(
                f"{name}={value!r} is not a multiple of {self.size_multiple} (VAE scale factor "
                f"{self.vae_scale_factor} x transformer patch size {self.patch_size}) for {self.path}"
            )
        if self.max_image_size is not None and value > self.max_image_size:
            raise ValueError(
                f"{name}={value!r} exceeds {self.max_image_size}, the largest size the transformer's "
                f"positional embedding covers for {self.path}"
            )
        return value

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, key: str = "actor_rollout_ref.model.path", backend: str = "diffusers"
    ) -> ModelSpec:
        """Read and validate a local diffusers pipeline directory that ``backend`` can serve; ``ValueError``
        naming ``key`` otherwise."""
        root = Path(os.path.expanduser(str(path))).resolve()  # actors may run in another working directory
        if not root.is_dir():
            raise ValueError(f"{key}={str(path)!r} is not a directory: the {backend} backend needs a local pipeline")
        index = read_model_index(root, key)
        pipeline_class = index.get("_class_name")
        adapter_path(pipeline_class, backend, key=f"{key}={str(path)!r}")  # raises for a model it has no pipeline for
        missing = [c for c in _REQUIRED_COMPONENTS if not _component_present(index, root, c)]
        if missing:
            raise ValueError(f"{key}={str(path)!r} lacks pipeline component(s) {missing}")
        if _component_present(index, root, "transformer_2"):
            raise ValueError(
                f"{key}={str(path)!r} has a second transformer (transformer_2, e.g. Wan2.2-T2V-A14B's low-noise "
                "expert) and verl-omni trains one; valid choices: a checkpoint with one transformer "
                "(Wan2.1-T2V-1.3B/14B, Wan2.2-TI2V-5B)"
            )

        vae = _read_json(root / "vae" / "config.json", key, path)
        transformer = _read_json(root / "transformer" / "config.json", key, path)
        entry = MODEL_PIPELINES[pipeline_class]
        # a 3-D VAE (Wan) states its factors; a 2-D KL VAE downsamples once per block after the first
        vae_scale_factor = int(
            vae.get("scale_factor_spatial") or 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        )
        latent_channels = int(vae.get("latent_channels", vae.get("z_dim", transformer.get("in_channels", 16))))
        # a transformer reading 2x2 patches of the VAE latents as channels packs them: 4x the channels (FLUX states
        # patch_size 1 for its packed tokens, Qwen-Image 2: the packing is the patch)
        packing = 2 if int(transformer.get("in_channels", latent_channels)) == 4 * latent_channels else 1
        patch = transformer.get("patch_size", 2)
        patch_size = max(int(patch[-1] if isinstance(patch, list) else patch), packing)  # Wan: (frames, rows, cols)
        sample_size = int(transformer.get("sample_size", 128))
        default_size = entry.default_size or (sample_size * vae_scale_factor, sample_size * vae_scale_factor)
        pos_max = transformer.get("pos_embed_max_size")
        # the T5 encoder: SD3's third text encoder, FLUX's second, Wan's only one (UMT5)
        t5 = next((n for n in ("_3", "_2", "") if "T5" in str(index.get(f"text_encoder{n}", ""))), "_3")
        has_t5 = _component_present(index, root, f"text_encoder{t5}")
        t5_max = None
        if _component_present(index, root, f"tokenizer{t5}"):
            tok_cfg_file = root / f"tokenizer{t5}" / "tokenizer_config.json"
            if tok_cfg_file.is_file():
                raw = _read_json(tok_cfg_file, key, path).get("model_max_length")
                t5_max = int(raw) if isinstance(raw, int | float) and raw < 1e9 else None
        return cls(
            path=str(root),
            pipeline_class=pipeline_class,
            vae_scale_factor=vae_scale_factor,
            patch_size=patch_size,
            latent_channels=latent_channels,
            default_height=default_size[0],
            default_width=default_size[1],
            max_latent_size=None if pos_max is None else int(pos_max) * patch_size,
            has_t5=has_t5,
            t5_max_length=t5_max,
            temporal_scale_factor=int(vae.get("scale_factor_temporal") or 4) if entry.num_frames else None,
            default_num_frames=entry.num_frames,
        )


def _component_present(index: dict[str, Any], root: Path, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and (root / name).is_dir()


def read_model_index(path: str | os.PathLike, key: str = "actor_rollout_ref.model.path") -> dict[str, Any]:
    """A diffusers pipeline directory's ``model_index.json`` (its pipeline class and components); ``ValueError``
    naming ``key`` when there is none or it cannot be read. Every reader of a checkpoint's index goes through here."""
    index_file = Path(os.path.expanduser(str(path))) / "model_index.json"
    if not index_file.is_file():
        raise ValueError(
            f"{key}={str(path)!r} is not a diffusers pipeline (no model_index.json); "
            "build the tiny CPU model with `python -m verl_omni.models.tiny_sd3 --out DIR`"
        )
    index = _read_json(index_file, key, path)
    if not isinstance(index, dict):
        raise ValueError(f"{key}={str(path)!r}: model_index.json is not a JSON object")
    return index


def _read_json(file: Path, key: str, path: Any) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{key}={str(path)!r} is missing {file.relative_to(file.parents[1])}") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}={str(path)!r}: cannot read {file.name}: {err}") from None


def load_scheduler(path: str | os.PathLike) -> Any:
    """The checkpoint's own scheduler: the class its ``model_index.json`` names, loaded from ``scheduler/`` as
    ``DiffusionPipeline.from_pretrained`` loads it (a Wan checkpoint's ``UniPCMultistepScheduler`` with its
    ``flow_shift``; read as another class, its schedule would silently change)."""
    import diffusers

    entry = read_model_index(path).get("scheduler")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else "FlowMatchEulerDiscreteScheduler"
    scheduler_cls = getattr(diffusers, str(name), None)
    if scheduler_cls is None:
        raise ValueError(f"{path}: model_index.json names the scheduler {name!r}, which diffusers does not have")
    return scheduler_cls.from_pretrained(str(path), subfolder="scheduler")
