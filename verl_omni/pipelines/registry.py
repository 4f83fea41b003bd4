"""Which model families each rollout backend can serve, and where each family's code lives.

Keyed by the diffusers pipeline class (``_class_name`` in a checkpoint's ``model_index.json``). A model family
is one package, ``verl_omni.pipelines.<model>``, holding its conditioning and sampling plus one thin adapter per
backend; adding a model is a new package and one entry here, never an edit to an engine or a server.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

ROLLOUT_BACKENDS: tuple[str, ...] = ("diffusers", "vllm_omni")


@dataclass(frozen=True)
class ModelPipelines:
    """Dotted import paths (``package.module.Name``) of one model family's code; None: unsupported.

    Attributes:
        trainer: ``compute_log_prob(transformer, latents, next_latents, sigmas, sigmas_next, conditioning,
            negative_conditioning, guidance_scale, noise_level, detach_uncond, dtype)``: the family's log-prob of
            stored transitions, with its conditioning bundles as the rollout recorded them.
        diffusers: class wrapping a loaded ``diffusers`` pipeline for the diffusers engine.
        vllm_omni: vllm-omni custom pipeline class (``custom_pipeline_args["pipeline_class"]``); imported only
            inside vllm-omni's workers.
        true_cfg: ``guidance_scale > 1`` runs classifier-free guidance with a negative prompt; False for a
            guidance-distilled family (FLUX.1-dev), whose transformer takes the scale as an input and which has
            no negative prompt to encode, record or accept.
        num_frames: a video family's default frame count (its pipeline's default); None for an image family,
            which takes no ``num_frames``.
        default_size: ``(height, width)`` in pixels when the transformer config has no ``sample_size`` to derive
            it from (the pipeline's default); None: ``sample_size * vae_scale_factor``.
        schedule: ``scheduler_sigmas(scheduler, num_inference_steps, height, width, vae_scale_factor, patch_size)``:
            the family's N + 1 sigmas, which the vllm_omni server checks the engine's timesteps against (it loads
            no pipeline to ask); set with ``vllm_omni``.
    """

    trainer: str
    diffusers: str | None = None
    vllm_omni: str | None = None
    true_cfg: bool = True
    num_frames: int | None = None
    default_size: tuple[int, int] | None = None
    schedule: str | None = None


MODEL_PIPELINES: dict[str, ModelPipelines] = {
    "StableDiffusion3Pipeline": ModelPipelines(
        trainer="verl_omni.pipelines.sd3.sampling.compute_log_prob",
        diffusers="verl_omni.pipelines.sd3.diffusers_adapter.SD3DiffusersAdapter",
        vllm_omni="verl_omni.pipelines.sd3.vllm_omni_pipeline.SD3FlowGRPOPipeline",
        schedule="verl_omni.pipelines.sd3.sampling.scheduler_sigmas",
    ),
    "FluxPipeline": ModelPipelines(
        trainer="verl_omni.pipelines.flux.sampling.compute_log_prob",
        diffusers="verl_omni.pipelines.flux.diffusers_adapter.FluxDiffusersAdapter",
        vllm_omni="verl_omni.pipelines.flux.vllm_omni_pipeline.FluxFlowGRPOPipeline",
        true_cfg=False,
        schedule="verl_omni.pipelines.flux.sampling.scheduler_sigmas",
    ),
    # Qwen-Image: true CFG with a negative prompt (guidance_scale is the pipeline's true_cfg_scale).
    "QwenImagePipeline": ModelPipelines(
        trainer="verl_omni.pipelines.qwen_image.sampling.compute_log_prob",
        diffusers="verl_omni.pipelines.qwen_image.diffusers_adapter.QwenImageDiffusersAdapter",
        vllm_omni="verl_omni.pipelines.qwen_image.vllm_omni_pipeline.QwenImageFlowGRPOPipeline",
        schedule="verl_omni.pipelines.qwen_image.sampling.scheduler_sigmas",
    ),
    # Wan 2.1 / 2.2 text-to-video with one transformer. vllm-omni 0.28 serves WanPipeline checkpoints with its
    # Wan22Pipeline (vllm_omni/diffusion/models/wan2_2), subclassed by the FlowGRPO pipeline. Defaults: WanPipeline's.
    "WanPipeline": ModelPipelines(
        trainer="verl_omni.pipelines.wan.sampling.compute_log_prob",
        diffusers="verl_omni.pipelines.wan.diffusers_adapter.WanDiffusersAdapter",
        vllm_omni="verl_omni.pipelines.wan.vllm_omni_pipeline.WanFlowGRPOPipeline",
        schedule="verl_omni.pipelines.wan.sampling.schedule_sigmas",
        num_frames=81,
        default_size=(480, 832),
    ),
}


def supported_pipelines(backend: str) -> tuple[str, ...]:
    """The diffusers pipeline classes ``backend`` has an adapter for."""
    check_backend_name(backend)
    return tuple(name for name, entry in MODEL_PIPELINES.items() if getattr(entry, backend) is not None)


def adapter_path(pipeline_class: str | None, backend: str, key: str = "actor_rollout_ref.model.path") -> str:
    """The dotted path of ``backend``'s adapter for ``pipeline_class``; ``ValueError`` naming the valid choices."""
    check_backend_name(backend)
    entry = MODEL_PIPELINES.get(pipeline_class) if isinstance(pipeline_class, str) else None
    path = None if entry is None else getattr(entry, backend)
    if path is None:
        raise ValueError(
            f"{key} holds a {pipeline_class!r} pipeline, which the {backend!r} rollout backend has no pipeline for; "
            f"valid choices: {', '.join(supported_pipelines(backend)) or 'none'}"
        )
    return path


def load_adapter(pipeline_class: str, backend: str) -> Any:
    """Import and return ``backend``'s adapter class for ``pipeline_class``."""
    module, _, name = adapter_path(pipeline_class, backend).rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_schedule(pipeline_class: str) -> Any:
    """The family's ``scheduler_sigmas`` (see :attr:`ModelPipelines.schedule`) for ``pipeline_class``."""
    path = MODEL_PIPELINES[pipeline_class].schedule
    if path is None:
        raise ValueError(f"{pipeline_class} declares no schedule function in verl_omni.pipelines.registry")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_trainer_binding(pipeline_class: str | None, key: str = "actor_rollout_ref.model.path") -> Any:
    """The model family's ``compute_log_prob`` for ``pipeline_class``; ``ValueError`` naming the valid choices."""
    entry = MODEL_PIPELINES.get(pipeline_class) if isinstance(pipeline_class, str) else None
    if entry is None:
        raise ValueError(
            f"{key} holds a {pipeline_class!r} pipeline, which verl-omni cannot train; "
            f"valid choices: {', '.join(MODEL_PIPELINES)}"
        )
    module, _, name = entry.trainer.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_negative_prompt(pipeline_class: str, key: str, negative_prompt: str) -> None:
    """``ValueError`` naming ``key`` when a negative prompt is asked of a family without classifier-free guidance
    (it would be silently ignored)."""
    entry = MODEL_PIPELINES.get(pipeline_class)
    if negative_prompt and entry is not None and not entry.true_cfg:
        raise ValueError(
            f"{key}={negative_prompt!r}: a {pipeline_class} checkpoint is guidance-distilled (guidance_scale is its "
            "embedded guidance; it runs no classifier-free guidance to use a negative prompt); valid choices: ''"
        )


def check_backend_name(backend: object) -> None:
    """``ValueError`` naming ``actor_rollout_ref.rollout.name`` and the valid choices unless ``backend`` is one."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(
            f"actor_rollout_ref.rollout.name={backend!r} is not a rollout backend of verl-omni; "
            f"valid choices: {', '.join(ROLLOUT_BACKENDS)}"
        )
