"""The ``diffusion_single_turn_agent`` loop: one prompt in, one image and its trajectory out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, register

from verl_omni.workers.config.rollout_routing import DEFAULT_ROUTING_KEY_FIELD
from verl_omni.workers.rollout.diffusion_output import DiffusionOutput

DIFFUSION_AGENT_NAME = "diffusion_single_turn_agent"


class DiffusionAgentLoopOutput(BaseModel):
    """What one run returns to the worker: the server output plus how it was routed."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    request_id: str
    routing_key: str | None
    output: DiffusionOutput
    reward: float | None = None
    reward_s: float | None = None


@register(DIFFUSION_AGENT_NAME)
class DiffusionSingleTurnAgentLoop(AgentLoopBase):
    """Single-turn text-to-image generation through the rollout client.

    verl instantiates agent loops with LLM plumbing (tokenizer, processor, chat templates); a
    diffusion prompt is sent as text and tokenized by the replica's own pipeline, so this loop
    keeps only the config and the client from verl's constructor arguments.
    """

    def __init__(self, trainer_config: Any, server_manager: Any, reward_fn: Callable | None = None, **kwargs: Any):
        self.config = trainer_config.config
        self.reward_fn = reward_fn
        self.rollout_config = self.config.actor_rollout_ref.rollout
        self.server_manager = server_manager
        routing = self.rollout_config.get("server_routing") or {}
        self.routing_key_field: str = routing.get("routing_key_field", DEFAULT_ROUTING_KEY_FIELD)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> DiffusionAgentLoopOutput:
        """Generate one sample; ``kwargs`` are the row's non-tensor fields (``prompt``, ``uid``, ...)."""
        prompt = kwargs.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"sample field 'prompt' must be the prompt text, got {type(prompt).__name__}: {prompt!r}")
        request_id = str(kwargs["request_id"])
        key = kwargs.get(self.routing_key_field)
        routing_key = None if key is None else str(key)
        output = await self.server_manager.generate(
            request_id,
            prompt_ids=prompt,
            sampling_params=sampling_params,
            routing_key=routing_key,
        )
        result = DiffusionAgentLoopOutput(request_id=request_id, routing_key=routing_key, output=output)
        if self.reward_fn is not None:
            # Scored as soon as this sample is back, in a thread: other samples keep rolling out.
            start = time.perf_counter()
            score = await asyncio.to_thread(self.reward_fn, output.image.unsqueeze(0), [prompt])
            result.reward = float(score[0])
            result.reward_s = time.perf_counter() - start
        return result
