"""Schema of the ``actor_rollout_ref.rollout.diffusion`` section: the ``diffusers`` rollout backend.

verl's ``RolloutConfig`` is written for LLM engines; everything a diffusion replica needs beyond it
(sampling defaults, request batching, prompt cache, CPU/GPU placement) lives here. Every key is
optional; a missing section means these defaults. A checked section (:mod:`verl_omni.workers.config.schema`;
no verl import), so the recipe checks it before verl, torch or Ray load.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Literal, get_args

from verl_omni.pipelines.sde_window import resolve_sde_window
from verl_omni.workers.config.schema import ConfigError, Section, option, section

DIFFUSION_CONFIG_PREFIX = "actor_rollout_ref.rollout.diffusion"
_CHUNK_RANGE = "must be an integer in [1, max_num_seqs={max_num_seqs}]"
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
SDEType = Literal["sde", "cps"]  # verl_omni.pipelines.flow_match_sde.SDE_STEPS (torch) holds their steps
# A request may also ask for "ode": every window step deterministic, recorded with log-prob 0 (DiffusionNFT's
# rollout, which needs the clean sample and the schedule and no density); not a choice of diffusion.sde_type.
REQUEST_SDE_TYPES: tuple[str, ...] = (*get_args(SDEType), "ode")


@section(DIFFUSION_CONFIG_PREFIX)
class DiffusionRolloutConfig(Section):
    """Defaults and resources of the ``diffusers`` rollout replicas.

    Sampling defaults (a request's ``sampling_params`` override them per request):
        num_inference_steps: denoising steps (FlowGRPO trains with few, e.g. 10).
        guidance_scale: classifier-free guidance; CFG runs only when > 1.
        negative_prompt: CFG negative prompt.
        noise_level: SDE noise level ``a`` (paper: 0.7); 0 makes every step an ODE step.
        sde_window: ``[start, end)`` step indices sampled as SDE steps (and recorded); null = all.
        sde_type: the stochastic step: ``sde`` (FlowGRPO's, the default) or ``cps`` (coefficients-preserving
            sampling: noise ``s_next sin(a pi/2)``; the authors' Fast configs use ``noise_level`` 0.8 with it).
        height, width: image size in pixels; null = the model's default (transformer sample size times
            the VAE scale factor). Must be multiples of ``vae_scale_factor * patch_size``.
        num_frames: video families only (Wan): frames per video, ``k * temporal_scale_factor + 1`` (4k + 1 for
            Wan's causal VAE); null = the family's default (81 for Wan), and null for an image family.
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

    num_inference_steps: int = option(10, ge=1, sampling=True)
    guidance_scale: float = option(4.5, ge=0, sampling=True)
    negative_prompt: str = option("", sampling=True)
    noise_level: float = option(0.7, ge=0, sampling=True)
    sde_window: list[int] | None = option(None, sampling=True, why="must be [start, end) step indices or null")
    sde_type: SDEType = option("sde", sampling=True, why="is not a valid SDE step; valid choices: {choices}")
    height: int | None = option(None, ge=1, sampling=True)
    width: int | None = option(None, ge=1, sampling=True)
    num_frames: int | None = option(None, ge=1, sampling=True, note="video families; null for images")
    max_sequence_length: int | None = option(None, ge=1, le=512, note="SD3's T5 limit is 512")

    admission_window_ms: float = option(10.0, ge=0, note="milliseconds")
    max_num_seqs: int = option(16, ge=1)
    prompt_cache_size: int = option(256, ge=0, note="0 disables the cache")

    device: Device = option("auto", why="is not a valid device; valid choices: {choices}")
    dtype: Dtype = option("auto", why="is not a valid dtype; valid choices: {choices}")
    num_gpus_per_replica: float = option(1.0, gt=0)
    ray_num_cpus: float = option(0.5, ge=0)
    cpu_threads: int = option(1, ge=1)
    batch_invariant: bool = True
    chunk_size: int = option(8, why=_CHUNK_RANGE)  # the range depends on max_num_seqs: checked in __post_init__

    def __post_init__(self) -> None:
        """The rules between fields. Checks that need the model (image size against the VAE, SDE window against
        the schedule) are done when the replica reads the model, still before any actor starts."""
        if self.sde_window is not None:
            try:
                resolve_sde_window(self.num_inference_steps, list(self.sde_window))
            except (TypeError, ValueError) as err:
                raise ConfigError(str(err)) from None
        if not 1 <= self.chunk_size <= self.max_num_seqs:
            raise ConfigError(f"chunk_size={self.chunk_size!r} {_CHUNK_RANGE.format(max_num_seqs=self.max_num_seqs)}")

    @classmethod
    def sampling_keys(cls) -> tuple[str, ...]:
        """The fields that are per-request sampling parameters (a request's ``sampling_params`` override them)."""
        return tuple(
            f.name for f in fields(cls) if (cls.__pydantic_fields__[f.name].json_schema_extra or {}).get("sampling")
        )
