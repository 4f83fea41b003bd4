"""The ``diffusion_single_turn_agent`` loop: one prompt in, one image and its trajectory out."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, register

from verl_omni.agent_loop.group_reward import score_group
from verl_omni.protocol import Conditioning, Sample
from verl_omni.rewards.weighted import WeightedReward

DIFFUSION_AGENT_NAME = "diffusion_single_turn_agent"


class DiffusionAgentLoopOutput(BaseModel):
    """What one run returns to the worker: the sample, how it was routed and its reward.

    ``conditioning`` is the table the sample's conditioning keys refer to: its group's, shared (not copied) by
    every sample of the group.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    request_id: str
    routing_key: str | None
    sample: Sample
    conditioning: dict[str, Conditioning]
    reward: float | None = None
    reward_terms: dict[str, float] | None = None
    reward_s: float | None = None
    sampled_at: float | None = None  # time.perf_counter() when the image was back (this process's clock)
    scored_at: float | None = None  # ... and when its reward was


@register(DIFFUSION_AGENT_NAME)
class DiffusionSingleTurnAgentLoop(AgentLoopBase):
    """Single-turn text-to-image generation through the rollout client.

    verl instantiates agent loops with LLM plumbing (tokenizer, processor, chat templates); a
    diffusion prompt is sent as text and tokenized by the replica's own pipeline, so this loop
    keeps only the config and the client from verl's constructor arguments.
    """

    def __init__(self, trainer_config: Any, client: Any, reward_fn: WeightedReward | None = None, **kwargs: Any):
        self.config = trainer_config.config
        self.reward_fn = reward_fn
        self.rollout_config = self.config.actor_rollout_ref.rollout
        self.client = client

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> DiffusionAgentLoopOutput:
        """verl's per-sample entry: one sample (a group of one); ``kwargs`` are the row's non-tensor fields."""
        field = self.client.routing.routing_key_field
        if field not in kwargs:
            raise missing_routing_key_field(field, kwargs)
        request = {
            "request_id": str(kwargs["request_id"]),
            "prompt_ids": prompt_of(kwargs.get("prompt")),
            "sampling_params": sampling_params,
        }
        key = kwargs[field]
        (result,) = await self.run_group([request], routing_key=None if key is None else str(key))
        return result

    async def run_group(
        self, requests: list[dict[str, Any]], routing_key: str | None
    ) -> list[DiffusionAgentLoopOutput]:
        """Generate the requests of one routing key with one client call (``generate_group``), in order.

        ``requests`` are as the server takes them (``request_id``, ``prompt_ids`` text, ``sampling_params``).
        With a reward, the group is scored in one call, in a thread, as soon as its images are back: other groups
        keep sampling meanwhile.
        """
        group = await self.client.generate_group(requests, routing_key=routing_key)
        back = time.perf_counter()
        results = [
            DiffusionAgentLoopOutput(
                request_id=request["request_id"],
                routing_key=routing_key,
                sample=sample,
                conditioning=group.conditioning,
                sampled_at=back,
            )
            for request, sample in zip(requests, group.samples, strict=True)
        ]
        if self.reward_fn is not None:
            await score_group(self.reward_fn, results, [r["prompt_ids"] for r in requests])
        return results


def prompt_of(value: Any) -> str:
    """A row's ``prompt`` field, which must be the prompt text."""
    if not isinstance(value, str):
        raise ValueError(f"sample field 'prompt' must be the prompt text, got {type(value).__name__}: {value!r}")
    return value


def missing_routing_key_field(field: str, fields: Any) -> ValueError:
    """The error for a ``routing_key_field`` the batch does not have (never a silent fallback to request ids)."""
    return ValueError(
        f"actor_rollout_ref.rollout.server_routing.routing_key_field={field!r} is not a field of the batch; "
        f"its fields: {sorted(fields)}"
    )
