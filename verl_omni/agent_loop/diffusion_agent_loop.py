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
        """Generate one sample (a group of one); ``kwargs`` are the row's non-tensor fields (``prompt``, ...)."""
        field = self.client.routing.routing_key_field
        (result,) = await self.run_group([(sampling_params, kwargs)], routing_key=routing_key_of(kwargs, field))
        return result

    async def run_group(
        self, samples: list[tuple[dict[str, Any], dict[str, Any]]], routing_key: str | None
    ) -> list[DiffusionAgentLoopOutput]:
        """Generate the samples of one routing key with one client call (``generate_group``), in order.

        ``samples`` holds ``(sampling_params, row fields)`` as :meth:`run` takes them. With a reward, the group
        is scored in one call, in a thread, as soon as its images are back: other groups keep sampling meanwhile.
        """
        requests = [_prompt_and_id(kwargs) for _, kwargs in samples]
        group = await self.client.generate_group(
            [
                {"request_id": request_id, "prompt_ids": prompt, "sampling_params": params}
                for (params, _), (prompt, request_id) in zip(samples, requests, strict=True)
            ],
            routing_key=routing_key,
        )
        back = time.perf_counter()
        results = [
            DiffusionAgentLoopOutput(
                request_id=request_id,
                routing_key=routing_key,
                sample=sample,
                conditioning=group.conditioning,
                sampled_at=back,
            )
            for (_, request_id), sample in zip(requests, group.samples, strict=True)
        ]
        if self.reward_fn is not None:
            await score_group(self.reward_fn, results, [prompt for prompt, _ in requests])
        return results


def routing_key_of(row: dict[str, Any], field: str) -> str | None:
    """The row's routing key: the value of ``field`` as a string (None when the value is None)."""
    if field not in row:
        raise missing_routing_key_field(field, row)
    value = row[field]
    return None if value is None else str(value)


def _prompt_and_id(row: dict[str, Any]) -> tuple[str, str]:
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"sample field 'prompt' must be the prompt text, got {type(prompt).__name__}: {prompt!r}")
    return prompt, str(row["request_id"])


def missing_routing_key_field(field: str, fields: Any) -> ValueError:
    """The error for a ``routing_key_field`` the batch does not have (never a silent fallback to request ids)."""
    return ValueError(
        f"actor_rollout_ref.rollout.server_routing.routing_key_field={field!r} is not a field of the batch; "
        f"its fields: {sorted(fields)}"
    )
