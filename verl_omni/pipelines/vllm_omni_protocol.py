"""The wire format between the ``vllm_omni`` rollout server and verl-omni's custom vllm-omni pipelines.

vllm-omni's ``OmniSamplingParams`` has no field for FlowGRPO's knobs and its ``OmniRequestOutput`` has
three trajectory fields; this module says what goes where, on both sides, so the server and the pipeline (which
runs inside vllm-omni's worker processes) cannot drift apart. Pure functions of plain values: tested on CPU.

Request: the usual fields (steps, guidance, size, seed, ``lora_request``) plus ``extra_args[EXTRA_ARGS_KEY]`` =
``{"noise_level", "sde_window", "chunk_size", "sde_type", "record_noise"}``; the prompt is
``{"prompt", "negative_prompt"}``.

Response, per request: ``images[0]`` the image (a video family's decoded video in [-1, 1], which vllm-omni's
video post-processing hands back as floats in [0, 1], frames first); ``trajectory_log_probs`` (T,) float32;
``trajectory_timesteps`` (T,) the transformer's timestep input of each recorded step; ``trajectory_latents`` a dict
of tensors: ``latents`` (T + 1, C, h, w) (``(T + 1, C, f, h, w)`` for a video), ``x_s`` before each recorded step
then ``x_next`` of the last one (the recorded steps are consecutive), and the model's conditioning bundle under
``conditioning.<field>`` and the CFG negative's under ``negative_conditioning.<field>`` (absent when T == 0, the
negative without CFG); with ``record_noise`` also ``noise`` (T, C, h, w) (a video's ``(T, C, f, h, w)``), each
recorded step's standard-normal draw (``latents[t + 1]`` is the step's mean plus its std times ``noise[t]``).
Sigmas are not sent: the server recomputes the schedule with the same shared function and checks the timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from verl_omni.pipelines.flow_match_sde import TIMESTEP_SCALE, SDETrajectory
from verl_omni.protocol import Conditioning, Sample
from verl_omni.request import SamplingParams

EXTRA_ARGS_KEY = "verl_omni_flowgrpo"
# The worker extension (imports vllm-omni, so named here by path) and its full-weight RPC.
WORKER_EXTENSION = "verl_omni.workers.rollout.vllm_omni_worker_extension.VerlOmniWorkerExtension"
LOAD_WEIGHTS_METHOD = "verl_omni_load_transformer_weights"
_POSITIVE, _NEGATIVE = "conditioning.", "negative_conditioning."


@dataclass(frozen=True)
class FlowGRPOArgs:
    """FlowGRPO's per-request knobs as the pipeline reads them from ``extra_args``."""

    noise_level: float
    sde_window: tuple[int, int]
    chunk_size: int | None
    sde_type: str = "sde"
    record_noise: bool = False

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> FlowGRPOArgs:
        """Read what :func:`sampling_kwargs` wrote; a request without it is not from a verl-omni server."""
        entry = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if not isinstance(entry, Mapping):
            raise ValueError(
                f"extra_args[{EXTRA_ARGS_KEY!r}] is missing: this pipeline serves FlowGRPO rollouts from verl-omni's "
                "vllm_omni rollout server, which sets noise_level and sde_window there"
            )
        start, end = entry["sde_window"]
        return cls(
            float(entry["noise_level"]),
            (int(start), int(end)),
            entry.get("chunk_size"),
            entry["sde_type"],
            bool(entry.get("record_noise", False)),
        )

    @classmethod
    def for_warmup(cls, num_inference_steps: int) -> FlowGRPOArgs:
        """The knobs of vllm-omni's start-up warm-up request, which carries no ``extra_args``: the whole
        schedule as SDE steps, so the warm-up runs (and checks) the same code as a rollout."""
        return cls(0.7, (0, int(num_inference_steps)), None)


def request_groups(req: Any) -> list[tuple[FlowGRPOArgs, list[int]]]:
    """Pipeline side: the rows of a vllm-omni request batch that can share one sampling run, with their knobs.

    vllm-omni batches any concurrent requests; rows with different shapes, schedules, guidance or FlowGRPO knobs
    run as separate sub-batches, in first-seen order. vllm-omni's start-up warm-up request (no ``extra_args``)
    gets :meth:`FlowGRPOArgs.for_warmup`.
    """
    warmup = req.is_dummy_run()
    groups: dict[tuple, list[int]] = {}
    knobs: dict[tuple, FlowGRPOArgs] = {}
    for i, sp in enumerate(req.sampling_params_list):
        if warmup:
            args = FlowGRPOArgs.for_warmup(sp.num_inference_steps)
        else:
            args = FlowGRPOArgs.from_extra_args(sp.extra_args)
        frames = getattr(sp, "num_frames", None)  # a video family's; one sub-batch per frame count
        key = (sp.height, sp.width, frames, sp.num_inference_steps, sp.guidance_scale, args, sp.max_sequence_length)
        groups.setdefault(key, []).append(i)
        knobs[key] = args
    return [(knobs[key], rows) for key, rows in groups.items()]


def sample_by_group(req: Any, sample: Callable[[Any, list[int], FlowGRPOArgs], list[Any]]) -> list[Any]:
    """A FlowGRPO pipeline's ``forward``: ``sample(req, rows, args)`` per :func:`request_groups` sub-batch, the
    outputs back in the batch's request order."""
    outputs: list[Any] = [None] * req.num_reqs
    for args, rows in request_groups(req):
        for i, out in zip(rows, sample(req, rows, args), strict=True):
            outputs[i] = out
    return outputs


def prompt_field(prompt: Any, key: str) -> str:
    """``prompt`` or ``negative_prompt`` of a vllm-omni request's prompt (a text, or a dict of them); "" if absent."""
    if isinstance(prompt, str):
        return prompt if key == "prompt" else ""
    return prompt.get(key) or ""


def request_generators(req: Any, rows: Sequence[int], device: Any) -> list[torch.Generator]:
    """One generator per row, seeded with its request's seed (vllm-omni's warm-up request has none: 0)."""
    seeds = [req.sampling_params_list[i].seed for i in rows]
    return [torch.Generator(device=device).manual_seed(seed or 0) for seed in seeds]


class AdapterParams:
    """The resolved sampling parameters a family's diffusers adapter reads, from a vllm-omni request and its
    FlowGRPO knobs (``num_frames``: a video family's, else None)."""

    def __init__(self, sp: Any, args: FlowGRPOArgs) -> None:
        self.num_inference_steps = sp.num_inference_steps
        self.height = sp.height
        self.width = sp.width
        self.num_frames = getattr(sp, "num_frames", None)
        self.guidance_scale = sp.guidance_scale
        self.noise_level = args.noise_level
        self.sde_window = args.sde_window
        self.sde_type = args.sde_type


def sample_true_cfg(
    adapter: Any,
    req: Any,
    rows: Sequence[int],
    args: FlowGRPOArgs,
    device: Any,
    decode: Callable[[torch.Tensor, int | None], torch.Tensor],
) -> list[dict[str, Any]]:
    """A true-CFG family's sub-batch through its diffusers ``adapter`` (Qwen-Image, Wan): the prompts (and, with
    guidance above 1, the negatives) encoded, sampled, decoded by ``decode(latents, chunk_size)``; per row the
    ``OmniDiffusionOutput`` fields (the media and the packed trajectory)."""
    sp = req.sampling_params_list[rows[0]]
    prompts = [req.prompts[i] for i in rows]
    encodings = adapter.encode([prompt_field(p, "prompt") for p in prompts], args.chunk_size)
    negatives = None
    if sp.guidance_scale > 1.0:
        negatives = adapter.encode([prompt_field(p, "negative_prompt") for p in prompts], args.chunk_size)
    generators = request_generators(req, rows, device)
    traj = adapter.sample(encodings, negatives, generators, AdapterParams(sp, args), args.chunk_size)
    media = decode(traj.final_latents, args.chunk_size)
    return [
        {
            "output": media[j : j + 1],
            **pack_trajectory(
                traj, j, encodings[j], negatives[j] if negatives else None, record_noise=args.record_noise
            ),
        }
        for j in range(len(rows))
    ]


def check_rpc_results(results: Any, method: str, server_id: str) -> list[Any]:
    """``results`` of ``AsyncOmni.collective_rpc``, or ``RuntimeError`` naming the replica, the call and the error.

    vllm-omni returns a failed worker call as ``{"supported": False, "error": ...}`` (or ``{"todo": ...}`` for a
    stage that has no such call) instead of raising; unchecked, a failed weight update would look like success.
    """
    failures = []
    for stage, result in enumerate(results if isinstance(results, list) else [results]):
        if isinstance(result, Mapping) and (result.get("supported") is False or {"todo", "error"} & result.keys()):
            failures.append(f"stage {stage}: {result.get('error') or result}")
        elif getattr(result, "status", "SUCCESS") != "SUCCESS":  # sleep / wake_up acknowledgements
            failures.append(f"stage {stage}: {result.status} {getattr(result, 'error_msg', None) or ''}".strip())
    if failures:
        raise RuntimeError(f"{server_id}: collective_rpc({method!r}) failed: {'; '.join(failures)}")
    return list(results) if isinstance(results, list) else [results]


def sampling_kwargs(params: SamplingParams, max_sequence_length: int, chunk_size: int | None) -> dict:
    """Keyword arguments of vllm-omni's ``OmniSamplingParams`` for one resolved request (``num_frames`` for a video
    family's)."""
    kwargs = {
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "height": params.height,
        "width": params.width,
        "seed": params.seed,
        "max_sequence_length": max_sequence_length,
        "num_outputs_per_prompt": 1,
        "return_trajectory_latents": True,
        "extra_args": {
            EXTRA_ARGS_KEY: {
                "noise_level": params.noise_level,
                "sde_window": list(params.sde_window),
                "chunk_size": chunk_size,
                "sde_type": params.sde_type,
                "record_noise": params.record_noise,
            }
        },
    }
    if params.num_frames is not None:
        kwargs["num_frames"] = params.num_frames
    return kwargs


def engine_prompt(text: str, params: SamplingParams) -> dict[str, str]:
    """The prompt as vllm-omni takes it: text and the CFG negative."""
    return {"prompt": text, "negative_prompt": params.negative_prompt}


def pack_trajectory(
    traj: SDETrajectory,
    row: int,
    conditioning: Conditioning,
    negative: Conditioning | None,
    *,
    record_noise: bool,
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Pipeline side: row ``row`` of a batch's trajectory, with its conditioning bundles, as vllm-omni
    ``DiffusionOutput`` trajectory fields. ``record_noise`` (the request's :class:`FlowGRPOArgs`): each step's
    draw too, sent only when asked for (as large as the latents)."""
    payload: dict[str, torch.Tensor] = {"latents": traj.latents[row].float()}
    if record_noise:  # empty when T == 0, as the latents
        payload["noise"] = traj.noise[row].float()
    if traj.log_probs.shape[1]:
        payload.update({_POSITIVE + k: v.float() for k, v in conditioning.items()})
        payload.update({_NEGATIVE + k: v.float() for k, v in (negative or {}).items()})
    return {
        "trajectory_latents": payload,
        "trajectory_timesteps": (traj.sigmas[:-1] * TIMESTEP_SCALE).float(),
        "trajectory_log_probs": traj.log_probs[row].float(),
    }


def recorded_window(params: SamplingParams) -> tuple[int, int]:
    """The step indices ``[start, end)`` a request records: its SDE window, or none when ``noise_level == 0``."""
    return (0, 0) if params.noise_level == 0 else params.sde_window


def image_tensor(image: Any) -> torch.Tensor:
    """A PIL image (or an HWC uint8 array / CHW uint8 tensor) as a uint8 (3, H, W) CPU tensor."""
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[-1] == 3 and tensor.shape[0] != 3:
            tensor = tensor.permute(2, 0, 1)
    else:
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"engine image of dtype {tensor.dtype} and shape {tuple(tensor.shape)} is not RGB uint8")
    return tensor.contiguous()


def video_tensor(video: Any) -> torch.Tensor:
    """A video as vllm-omni's video post-processing returns it (floats in [0, 1], ``(1, F, H, W, 3)`` or
    ``(F, H, W, 3)``; or a uint8 ``(F, 3, H, W)`` tensor) as a uint8 (F, 3, H, W) CPU tensor, rounded as
    :func:`verl_omni.pipelines.sd3.sampling.images_to_uint8` rounds the diffusers backend's frames."""
    if isinstance(video, torch.Tensor) and video.dtype == torch.uint8:
        tensor = video.detach().cpu()
    else:
        frames = torch.as_tensor(np.asarray(video, dtype=np.float32))
        if frames.ndim == 5 and frames.shape[0] == 1:
            frames = frames[0]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"engine video of shape {tuple(frames.shape)} is not (F, H, W, 3) frames")
        tensor = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 3, 1, 2)
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise ValueError(f"engine video of dtype {tensor.dtype} and shape {tuple(tensor.shape)} is not RGB frames")
    return tensor.contiguous()


def to_sample(
    output: Any,
    request_id: str,
    text: str,
    params: SamplingParams,
    sigmas: torch.Tensor,
    model_version: int,
    extra_fields: dict[str, Any],
    true_cfg: bool = True,
) -> tuple[Sample, dict[str, Conditioning]]:
    """Server side: one vllm-omni ``OmniRequestOutput`` as a :class:`Sample` and its conditioning bundles, keyed by
    text (the prompt ``text`` and the negative prompt).

    ``sigmas`` is the request's full schedule (N + 1 values, from the same shared function the pipeline used).
    ``true_cfg``: the family runs classifier-free guidance when ``guidance_scale > 1`` (False for a
    guidance-distilled family such as FLUX.1-dev, which records no negative).
    Raises ``RuntimeError`` naming the request for an aborted or malformed output (e.g. a stock pipeline that
    records no trajectory).
    """
    images = list(getattr(output, "images", None) or [])
    if not images:
        why = getattr(output, "error", None) or "no image (aborted, or the engine failed)"
        raise RuntimeError(f"vllm-omni request {request_id!r} returned {why}")
    if params.num_frames is None:
        image = image_tensor(images[0])
        shape, wanted = tuple(image.shape[1:]), (params.height, params.width)
    else:  # a video family: (F, 3, H, W)
        image = video_tensor(images[0])
        shape, wanted = (image.shape[0], *image.shape[2:]), (params.num_frames, params.height, params.width)
    if shape != wanted:
        raise RuntimeError(
            f"vllm-omni request {request_id!r} returned a {shape} {'image' if len(shape) == 2 else 'video'}, "
            f"{wanted} was requested"
        )
    start, end = recorded_window(params)
    steps = end - start
    payload = getattr(output, "trajectory_latents", None)
    log_probs = getattr(output, "trajectory_log_probs", None)
    timesteps = getattr(output, "trajectory_timesteps", None)
    if not isinstance(payload, Mapping) or "latents" not in payload or log_probs is None or timesteps is None:
        raise RuntimeError(
            f"vllm-omni request {request_id!r} carries no FlowGRPO trajectory: the engine must run verl-omni's "
            "custom pipeline (custom_pipeline_args['pipeline_class']), not the stock one"
        )
    latents = torch.as_tensor(payload["latents"]).float().cpu()
    log_probs = torch.as_tensor(log_probs).float().cpu().reshape(-1)
    timesteps = torch.as_tensor(timesteps).float().cpu().reshape(-1)
    expected_latents = steps + 1 if steps else 0
    if latents.shape[0] != expected_latents or log_probs.shape[0] != steps:
        raise RuntimeError(
            f"vllm-omni request {request_id!r} recorded {log_probs.shape[0]} log-probs and {latents.shape[0]} "
            f"latents; its SDE window {[start, end]} needs {steps} and {expected_latents}"
        )
    noise = None
    if params.record_noise:
        noise = torch.as_tensor(payload["noise"]).float().cpu() if "noise" in payload else None
        wanted = (steps, *latents.shape[1:])
        if noise is None or tuple(noise.shape) != wanted:
            got = "no noise" if noise is None else f"noise of shape {tuple(noise.shape)}"
            raise RuntimeError(
                f"vllm-omni request {request_id!r} set record_noise and returned {got}; its {steps} recorded steps "
                f"need {wanted}"
            )
    step_sigmas = sigmas[start : end + 1].float() if steps else sigmas[:0].float()
    if not torch.allclose(timesteps, step_sigmas[:-1] * TIMESTEP_SCALE, rtol=1e-6, atol=1e-4):
        raise RuntimeError(
            f"vllm-omni request {request_id!r} ran timesteps {timesteps.tolist()}, not the schedule's "
            f"{(step_sigmas[:-1] * TIMESTEP_SCALE).tolist()}: the engine's scheduler differs from the checkpoint's"
        )
    bundles: dict[str, Conditioning] = {}
    keys: dict[str, str | None] = {"conditioning": None, "negative_conditioning": None}
    if steps:
        for prefix, field, key in ((_POSITIVE, "conditioning", text), (_NEGATIVE, "negative_conditioning", None)):
            bundle = {
                k[len(prefix) :]: torch.as_tensor(v).float().cpu() for k, v in payload.items() if k.startswith(prefix)
            }
            if bundle:
                keys[field] = text if key is not None else params.negative_prompt
                bundles[keys[field]] = bundle
        if keys["conditioning"] is None:
            raise RuntimeError(f"vllm-omni request {request_id!r} recorded steps but not the prompt conditioning")
        if params.do_cfg and true_cfg and keys["negative_conditioning"] is None:
            raise RuntimeError(
                f"vllm-omni request {request_id!r} sampled with CFG but returned no negative conditioning"
            )
    sample = Sample(
        request_id=request_id,
        image=image,
        latents=latents,
        sigmas=step_sigmas.clone(),
        log_probs=log_probs,
        noise=noise,
        model_version=model_version,
        extra_fields={**extra_fields, "seed": params.seed, "sde_step_indices": list(range(start, end))},
        **keys,
    )
    return sample, bundles
