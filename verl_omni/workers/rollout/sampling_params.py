"""Per-request sampling parameters of the ``diffusers`` backend: defaults, validation, batch key.

A request's ``sampling_params`` dict may set any of :data:`SAMPLING_FIELDS`; missing fields take the
replica's ``rollout.diffusion`` defaults. Anything else is a ``ValueError`` naming the field and the
value, raised to the caller before the request is queued.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from typing import Any

from verl_omni.pipelines.registry import check_negative_prompt
from verl_omni.pipelines.sde_window import resolve_sde_window
from verl_omni.request import SAMPLING_FIELDS, SamplingParams
from verl_omni.workers.config.diffusion import REQUEST_SDE_TYPES, DiffusionRolloutConfig
from verl_omni.workers.rollout.model_spec import ModelSpec

_MAX_SEED = 2**63


def _number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"sampling_params.{name}={value!r} must be a finite number >= {minimum}")
    return float(value)


def resolve_sampling_params(
    sampling_params: Mapping[str, Any] | None,
    defaults: DiffusionRolloutConfig,
    spec: ModelSpec,
) -> SamplingParams:
    """Merge a request's ``sampling_params`` over the replica defaults and validate the result."""
    given = dict(sampling_params or {})
    unknown = sorted(set(given) - set(SAMPLING_FIELDS))
    if unknown:
        shown = ", ".join(f"{k}={given[k]!r}" for k in unknown)
        raise ValueError(
            f"unknown sampling_params field(s) {shown}; valid fields: {', '.join(SAMPLING_FIELDS)} "
            "(the diffusers backend takes no LLM sampling fields)"
        )

    seed = given.get("seed")
    if seed is None:
        seed = secrets.randbelow(_MAX_SEED)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"sampling_params.seed={seed!r} must be an integer in [0, 2**63)")

    steps = given.get("num_inference_steps", defaults.num_inference_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sampling_params.num_inference_steps={steps!r} must be an integer >= 1")

    guidance = _number("guidance_scale", given.get("guidance_scale", defaults.guidance_scale), 0.0)
    noise_level = _number("noise_level", given.get("noise_level", defaults.noise_level), 0.0)

    sde_type = given.get("sde_type", defaults.sde_type)
    if sde_type not in REQUEST_SDE_TYPES:
        raise ValueError(
            f"sampling_params.sde_type={sde_type!r} is not valid; valid choices: {', '.join(REQUEST_SDE_TYPES)}"
        )

    negative = given.get("negative_prompt", defaults.negative_prompt)
    if negative is None:
        negative = ""
    if not isinstance(negative, str):
        raise ValueError(f"sampling_params.negative_prompt={negative!r} must be a string")
    check_negative_prompt(spec.pipeline_class, "sampling_params.negative_prompt", negative)

    window = given.get("sde_window", defaults.sde_window)
    try:
        start, end = resolve_sde_window(steps, None if window is None else _as_list(window))
    except ValueError as err:
        raise ValueError(f"sampling_params.{err}") from None

    height = given.get("height", defaults.height)
    width = given.get("width", defaults.width)
    height = spec.default_height if height is None else spec.check_image_size("sampling_params.height", height)
    width = spec.default_width if width is None else spec.check_image_size("sampling_params.width", width)
    frames = given.get("num_frames", defaults.num_frames)
    frames = spec.default_num_frames if frames is None else spec.check_num_frames("sampling_params.num_frames", frames)

    record_noise = given.get("record_noise", False)
    if not isinstance(record_noise, bool):
        raise ValueError(f"sampling_params.record_noise={record_noise!r} must be true or false")

    return SamplingParams(
        seed=int(seed),
        num_inference_steps=int(steps),
        guidance_scale=guidance,
        negative_prompt=negative,
        noise_level=noise_level,
        sde_window=(start, end),
        height=int(height),
        width=int(width),
        sde_type=sde_type,
        num_frames=frames,
        record_noise=record_noise,
    )


def _as_list(window: Any) -> Any:
    """Lists and tuples (also OmegaConf ListConfig) as a list; anything else unchanged for the error message."""
    if isinstance(window, list | tuple):
        return list(window)
    try:
        from omegaconf import ListConfig

        if isinstance(window, ListConfig):
            return list(window)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return window
