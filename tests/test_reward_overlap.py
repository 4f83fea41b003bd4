"""Rewards overlap the rollout: each group is scored in one call as soon as its images are back, while other groups
still sample (``reward.overlap: true``), or every group after the whole chunk (``false``, the in-line baseline).

In-process, with a stub client whose groups come back in an order the test controls, and a reward that records
what it scored: the order of events is checked, never a duration.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.protocol import DataProto

from verl_omni.agent_loop import DiffusionAgentLoopWorker
from verl_omni.protocol import Sample, SampleGroup
from verl_omni.rewards import register_reward
from verl_omni.rewards.weighted import reward_specs
from verl_omni.utils.arrays import object_column
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig

EVENTS: list[str] = []
LOCK = threading.Lock()


@register_reward("test_overlap_recorder")
class RecordingReward:
    """Scores each image by its first pixel; records ``scored <prompts>`` and calls the test's hook."""

    on_score: Any = None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with LOCK:
            EVENTS.append(f"scored {','.join(prompts)}")
        if RecordingReward.on_score is not None:
            RecordingReward.on_score(prompts)
        return images[:, 0, 0, 0].float()


class OrderedClient:
    """Returns group ``b`` at once and holds group ``a`` until ``release_a`` is set."""

    def __init__(self) -> None:
        self.routing = RolloutServerRoutingConfig()
        self.release_a = asyncio.Event()

    async def generate_group(self, requests: list[dict], *, routing_key: str | None = None) -> SampleGroup:
        if routing_key == "a":
            await self.release_a.wait()
        with LOCK:
            EVENTS.append(f"sampled {routing_key}")
        return SampleGroup(samples=[self._output(r["request_id"], r["sampling_params"]["seed"]) for r in requests])

    @staticmethod
    def _output(request_id: str, seed: int) -> Sample:
        t = torch.zeros(2, dtype=torch.float64)
        return Sample(
            request_id=request_id,
            image=torch.full((3, 2, 2), seed % 256, dtype=torch.uint8),
            latents=torch.zeros(3, 1, 1, 1),
            sigmas=torch.zeros(3),
            log_probs=t,
            extra_fields={"server_id": "stub", "batch_size": 1, "cache_hit": False, "generate_s": 0.0},
        )


def _worker(client: OrderedClient, overlap: bool) -> DiffusionAgentLoopWorker:
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {}},
            "trainer": {"seed": 0},
            "reward": {"name": "test_overlap_recorder", "kwargs": {}, "weights": None, "overlap": overlap},
        }
    )
    return DiffusionAgentLoopWorker(config, client)


def _batch() -> DataProto:
    uids = ["a", "a", "a", "b", "b"]
    return DataProto.from_dict(
        non_tensors={
            "prompt": object_column([f"{u}{i}" for i, u in enumerate(uids)]),
            "uid": object_column(uids),
            "row_index": np.arange(len(uids)),
        },
        meta_info={"global_steps": 0, "seed": 1},
    )


@pytest.fixture(autouse=True)
def _clean_events():
    EVENTS.clear()
    yield
    RecordingReward.on_score = None


async def test_a_group_is_scored_while_another_is_still_sampling() -> None:
    client = OrderedClient()
    loop = asyncio.get_running_loop()
    # group a comes back only once group b has been scored: this finishes only if scoring overlaps sampling
    RecordingReward.on_score = lambda prompts: loop.call_soon_threadsafe(client.release_a.set)
    out = await asyncio.wait_for(_worker(client, overlap=True).generate_sequences(_batch()), timeout=120)
    assert EVENTS == ["sampled b", "scored b3,b4", "sampled a", "scored a0,a1,a2"]  # one call per group
    assert out.batch["rewards"].tolist() == [float(s % 256) for s in _seeds(out)]
    assert out.meta_info["reward_exposed_s"] >= 0.0


async def test_in_line_scores_every_group_after_the_whole_chunk() -> None:
    client = OrderedClient()
    client.release_a.set()
    out = await _worker(client, overlap=False).generate_sequences(_batch())
    sampled = [i for i, e in enumerate(EVENTS) if e.startswith("sampled")]
    scored = [e for e in EVENTS if e.startswith("scored")]
    assert max(sampled) < min(i for i, e in enumerate(EVENTS) if e.startswith("scored"))
    assert sorted(scored) == ["scored a0,a1,a2", "scored b3,b4"]
    # nothing hid the reward: the exposed time covers every scoring call (made one after another)
    reward_s = out.non_tensor_batch["reward_s"]
    assert out.meta_info["reward_exposed_s"] >= sum(float(s) for s in reward_s)
    assert out.batch["rewards"].tolist() == [float(s % 256) for s in _seeds(out)]


async def test_no_reward_no_exposed_time() -> None:
    client = OrderedClient()
    client.release_a.set()
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {}}, "trainer": {"seed": 0}})
    out = await DiffusionAgentLoopWorker(config, client).generate_sequences(_batch())
    assert out.meta_info["reward_exposed_s"] is None and "rewards" not in set(out.batch.keys())


def _seeds(out: DataProto) -> list[int]:
    """The seed each row was sampled with, read back from its image (the stub writes seed % 256 there)."""
    return [int(v) for v in out.batch["image"][:, 0, 0, 0].tolist()]


def test_overlap_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match=r"reward\.overlap='maybe' is not valid; valid choices: true, false"):
        reward_specs({"name": "geneval_color", "overlap": "maybe"})
