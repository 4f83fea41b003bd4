"""Scoring one group of samples in one reward call, off the event loop, so rollouts of other groups go on.

One call per group (not per sample) lets a batched scorer (a GPU model, OCR, a reward service) see the group's
images together; the call runs in a thread, so the agent-loop worker keeps awaiting the other groups' samples.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from verl_omni.rewards.weighted import WeightedReward


async def score_group(reward_fn: WeightedReward, results: Sequence[Any], prompts: Sequence[str]) -> None:
    """Set ``reward``, ``reward_terms``, ``reward_s`` (the call's seconds shared over its samples) and
    ``scored_at`` (``time.perf_counter()`` when the scores were back) on each result, in order."""
    import torch

    if not results:
        return
    images = torch.stack([r.sample.image for r in results])
    start = time.perf_counter()
    total, terms = await asyncio.to_thread(reward_fn, images, list(prompts))
    end = time.perf_counter()
    for i, result in enumerate(results):
        result.reward = float(total[i])
        result.reward_terms = {name: float(score[i]) for name, score in terms.items()}
        result.reward_s = (end - start) / len(results)
        result.scored_at = end


def reward_exposed_s(results: Sequence[Any], done_at: float) -> float | None:
    """Reward time not hidden behind sampling: from the last sample's return to ``done_at`` (every score back).

    0 when every group was scored while others still sampled (except the last group's own call); the whole
    reward time when scoring starts after sampling. None when the results carry no timestamps.
    """
    sampled = [r.sampled_at for r in results if getattr(r, "sampled_at", None) is not None]
    if not sampled:
        return None
    return max(0.0, done_at - max(sampled))
