"""Schema of the ``actor_rollout_ref.rollout.diffusion`` section: the ``diffusers`` rollout backend.

verl's ``RolloutConfig`` is written for LLM engines; everything a diffusion replica needs beyond it
(sampling defaults, request batching, prompt cache, CPU/GPU placement) lives here. Every key is
optional; a missing section means these defaults. A plain frozen dataclass (no verl import), so the
recipe checks it before verl, torch or Ray load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

DIFFUSION_CONFIG_PREFIX = "actor_rollout_ref.rollout.diffusion"
VALID_DEVICES = ("auto", "cpu", "cuda")
VALID_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DiffusionRolloutConfig:
    """Defaults and resources of the ``diffusers`` rollout replicas.

    Sampling defaults (a request's ``sampling_params`` override them per request):
        num_inference_steps: denoising steps (FlowGRPO trains with few, e.g. 10).
        guidance_scale: classifier-free guidance; CFG runs only when > 1.
        negative_prompt: CFG negative prompt.
        noise_level: SDE noise level ``a`` (paper: 0.7); 0 makes every step an ODE step.
        sde_window: ``[start, end)`` step indices sampled as SDE steps (and recorded); null = all.
        height, width: image size in pixels; null = the model's default (transformer sample size times
            the VAE scale factor). Must be multiples of ``vae_scale_factor * patch_size``.
        max_sequence_length: T5 tokens of the text conditioning; null = the T5 tokenizer's
            ``model_max_length`` capped at 256 (SD3's default), or 256 without a T5 tokenizer.

    Batching and caching:
        admission_window_ms: how long the first pending request waits for compatible requests to
            fuse with (requests of the same size, steps, guidance, noise level and SDE window).
        max_num_seqs: cap on the fused batch (images per denoising run; with CFG the transformer
            sees twice as many rows).
        prompt_cache_size: LRU entries of text encodings (one per distinct prompt or negative
            prompt), kept in host memory in float32: 12 KB each for the tiny model, about 5.5 MB for
            SD3.5 (333 x 4096). 0 disables the cache and every request encodes its own prompts.

    Placement:
        device: ``auto`` (one GPU per replica when the Ray cluster has GPUs, else CPU), ``cpu`` or ``cuda``.
        dtype: ``auto`` = float32 on CPU, the rollout's ``dtype`` on GPU.
        num_gpus_per_replica: Ray GPUs per replica on GPU (fractional to share a GPU with training).
        ray_num_cpus: Ray CPUs requested per replica actor. A scheduling token only: the actor's
            compute is bounded by ``cpu_threads``. The default 0.5 lets two replicas, a balancer and
            agent-loop workers share a small Ray (e.g. ``num_cpus=4``).
        cpu_threads: torch intra-op threads per replica on CPU (keep replicas x threads <= cores). Under
            ``batch_invariant`` the trainer's log-prob recompute runs with this count too (3 or 4 threads
            round differently from 1 or 2).
        batch_invariant: make a sample's numbers independent of the batch it ran in: every network
            call that touches samples (text encoders, transformer steps, VAE decode; in the trainer the
            log-prob recompute and the reference pass) runs at exactly ``chunk_size`` samples, the last
            chunk padded. On CPU also MKL in strict CNR mode (``MKL_CBWR=AVX2,STRICT``, set in the replica
            and actor processes) and oneDNN off: bit-identical, and the trainer's recomputed log-prob
            equals the stored one bit for bit. On GPU the shapes are fixed too, but bit-exactness is not
            claimed (bf16 sampling vs fp32 training never is). See docs/advanced_features/determinism.md.
        chunk_size: samples per network call under ``batch_invariant`` (with CFG the transformer sees
            ``2 * chunk_size`` rows); ``1 <= chunk_size <= max_num_seqs``. Best a divisor of
            ``max_num_seqs`` and of the actor's micro-batch, or padding wastes compute. Ignored otherwise.
    """

    _target_: str = "verl_omni.workers.config.diffusion.DiffusionRolloutConfig"

    num_inference_steps: int = 10
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    noise_level: float = 0.7
    sde_window: list[int] | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None

    admission_window_ms: float = 10.0
    max_num_seqs: int = 16
    prompt_cache_size: int = 256

    device: str = "auto"
    dtype: str = "auto"
    num_gpus_per_replica: float = 1.0
    ray_num_cpus: float = 0.5
    cpu_threads: int = 1
    batch_invariant: bool = True
    chunk_size: int = 8

    def __post_init__(self) -> None:
        validate_diffusion_config(self, prefix=DIFFUSION_CONFIG_PREFIX)

    @classmethod
    def from_config(cls, section: Any | None, prefix: str = DIFFUSION_CONFIG_PREFIX) -> DiffusionRolloutConfig:
        """Build from an OmegaConf/dict section (or return an instance as is); unknown keys are rejected."""
        if section is None:
            return cls()
        if isinstance(section, cls):
            return section
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
        data.pop("_target_", None)
        known = {f.name for f in fields(cls)} - {"_target_"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in {prefix}; valid keys: {sorted(known)}")
        if data.get("sde_window") is not None:
            data["sde_window"] = list(data["sde_window"])
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_diffusion_config(cfg: DiffusionRolloutConfig, prefix: str = DIFFUSION_CONFIG_PREFIX) -> None:
    """Raise ``ValueError`` naming the key and the bad value.

    Checks that need the model (image size against the VAE, SDE window against the schedule) are
    done when the replica reads the model, still before any actor starts.
    """

    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"{prefix}.{key}={getattr(cfg, key)!r} {why}")

    if not _is_int(cfg.num_inference_steps) or cfg.num_inference_steps < 1:
        raise bad("num_inference_steps", "must be an integer >= 1")
    for key in ("guidance_scale", "noise_level"):
        if not _is_number(getattr(cfg, key)) or getattr(cfg, key) < 0:
            raise bad(key, "must be a finite number >= 0")
    if not isinstance(cfg.negative_prompt, str):
        raise bad("negative_prompt", "must be a string")
    if cfg.sde_window is not None:
        from verl_omni.pipelines.flow_match_sde import resolve_sde_window

        try:
            resolve_sde_window(cfg.num_inference_steps, list(cfg.sde_window))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{prefix}.{err}") from None
    for key in ("height", "width", "max_sequence_length"):
        value = getattr(cfg, key)
        if value is not None and (not _is_int(value) or value < 1):
            raise bad(key, "must be a positive integer or null")
    if cfg.max_sequence_length is not None and cfg.max_sequence_length > 512:
        raise bad("max_sequence_length", "must be <= 512 (SD3's T5 limit)")
    if not _is_number(cfg.admission_window_ms) or cfg.admission_window_ms < 0:
        raise bad("admission_window_ms", "must be a finite number of milliseconds >= 0")
    if not _is_int(cfg.max_num_seqs) or cfg.max_num_seqs < 1:
        raise bad("max_num_seqs", "must be an integer >= 1")
    if not _is_int(cfg.prompt_cache_size) or cfg.prompt_cache_size < 0:
        raise bad("prompt_cache_size", "must be an integer >= 0 (0 disables the cache)")
    if cfg.device not in VALID_DEVICES:
        raise bad("device", f"is not a valid device; valid choices: {', '.join(VALID_DEVICES)}")
    if cfg.dtype not in VALID_DTYPES:
        raise bad("dtype", f"is not a valid dtype; valid choices: {', '.join(VALID_DTYPES)}")
    if not _is_number(cfg.num_gpus_per_replica) or cfg.num_gpus_per_replica <= 0:
        raise bad("num_gpus_per_replica", "must be a number > 0")
    if not _is_number(cfg.ray_num_cpus) or cfg.ray_num_cpus < 0:
        raise bad("ray_num_cpus", "must be a number >= 0")
    if not _is_int(cfg.cpu_threads) or cfg.cpu_threads < 1:
        raise bad("cpu_threads", "must be an integer >= 1")
    if not isinstance(cfg.batch_invariant, bool):
        raise bad("batch_invariant", "must be true or false")
    if not _is_int(cfg.chunk_size) or not 1 <= cfg.chunk_size <= cfg.max_num_seqs:
        raise bad("chunk_size", f"must be an integer in [1, max_num_seqs={cfg.max_num_seqs}]")
