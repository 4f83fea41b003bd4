"""What a diffusion rollout server returns for one request (the diffusion analogue of verl's ``TokenOutput``)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field


class DiffusionOutput(BaseModel):
    """One generated image and the SDE trajectory FlowGRPO trains on.

    Tensors are CPU tensors. ``T`` is the number of SDE (trainable) steps of the request, which may
    be fewer than ``num_inference_steps`` when an SDE window is used.

    Attributes:
        image: uint8 ``(3, H, W)``.
        latents: float32 ``(T, C, h, w)``: ``x_s`` before each SDE step.
        next_latents: float32 ``(T, C, h, w)``: ``x_next`` after each SDE step.
        sigmas: float32 ``(T,)``: noise level ``s`` of each SDE step.
        sigmas_next: float32 ``(T,)``: noise level ``s_next`` each SDE step moves to.
        timesteps: float32 ``(T,)``: the transformer's timestep input (``s * 1000``).
        log_probs: float32 ``(T,)``: ``log p(x_next | x_s)`` under the sampling policy.
        prompt_embeds / pooled_prompt_embeds: the conditioning used (``(L, D)`` and ``(P,)``), which the
            trainer needs to recompute log-probs; None when nothing was recorded (``T == 0``, ODE sampling).
        negative_prompt_embeds / negative_pooled_prompt_embeds: the CFG negative, or None without CFG
            (or without recorded steps).
        model_version: weight version that produced the sample (bumped by ``update_weights``).
        extra_fields: timings, the batch size the request ran in, prompt-cache hit, server id.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    model_version: int = 0
    extra_fields: dict[str, Any] = Field(default_factory=dict)
