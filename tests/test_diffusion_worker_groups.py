"""How ``DiffusionAgentLoopWorker`` sends rows to the client: one call per row, or one per routing key.

In-process, with a stub client that records its calls: the worker's grouping, row order, request ids
and seeds, without Ray or a model (the real path runs in tests/integration/test_diffusion_routing.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, register
from verl.protocol import DataProto

from verl_omni.agent_loop import DiffusionAgentLoopWorker, DiffusionSingleTurnAgentLoop
from verl_omni.utils.arrays import object_column
from verl_omni.workers.rollout.diffusion_output import DiffusionOutput

SINGLE_ONLY_AGENT = "test_single_sample_only_agent"


@register(SINGLE_ONLY_AGENT)
class SingleSampleOnlyAgentLoop(AgentLoopBase):
    """An agent loop that knows single samples only (no ``run_group``)."""

    def __init__(self, trainer_config: Any, server_manager: Any, reward_fn: Any = None, **kwargs: Any):
        self.inner = DiffusionSingleTurnAgentLoop(trainer_config, server_manager, reward_fn)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> Any:
        return await self.inner.run(sampling_params, **kwargs)


class StubClient:
    """Returns an output whose image encodes the request's seed; records every call."""

    def __init__(self, dispatches_groups: bool):
        self.dispatches_groups = dispatches_groups
        self.calls: list[tuple[str, list[str], str | None]] = []

    @staticmethod
    def _output(request_id: str, sampling_params: dict[str, Any]) -> DiffusionOutput:
        seed = sampling_params["seed"]
        t = torch.full((2,), float(seed), dtype=torch.float64)  # exact for any seed
        return DiffusionOutput(
            image=torch.full((3, 2, 2), seed % 256, dtype=torch.uint8),
            latents=t.view(2, 1, 1, 1),
            next_latents=t.view(2, 1, 1, 1),
            sigmas=t,
            sigmas_next=t,
            timesteps=t,
            log_probs=t,
            prompt_embeds=torch.zeros(1, 2),
            pooled_prompt_embeds=torch.zeros(2),
            extra_fields={"server_id": "stub", "batch_size": 1, "cache_hit": False, "generate_s": 0.0},
        )

    async def generate(self, request_id, *, prompt_ids, sampling_params, routing_key=None):
        self.calls.append(("generate", [request_id], routing_key))
        return self._output(request_id, sampling_params)

    async def generate_group(self, requests, *, routing_key=None):
        self.calls.append(("generate_group", [r["request_id"] for r in requests], routing_key))
        return [self._output(r["request_id"], r["sampling_params"]) for r in requests]


def _worker(client: StubClient) -> DiffusionAgentLoopWorker:
    config = OmegaConf.create(
        {"actor_rollout_ref": {"rollout": {"server_routing": {"routing_key_field": "uid"}}}, "trainer": {"seed": 0}}
    )
    return DiffusionAgentLoopWorker(config, client)


def _batch(uids: list[str | None], agent: str | None = None) -> DataProto:
    non_tensors = {
        "prompt": object_column([f"prompt of {u}" for u in uids]),
        "uid": object_column(uids),
        "row_index": np.arange(10, 10 + len(uids)),
    }
    if agent is not None:
        non_tensors["agent_name"] = object_column([agent] * len(uids))
    return DataProto.from_dict(non_tensors=non_tensors, meta_info={"global_steps": 3, "seed": 7})


UIDS = ["a", "b", "a", None, "b", "a", None]


async def test_rows_of_a_key_go_out_in_one_call_and_come_back_in_row_order():
    grouped_client, single_client = StubClient(dispatches_groups=True), StubClient(dispatches_groups=False)
    grouped = await _worker(grouped_client).generate_sequences(_batch(UIDS))
    single = await _worker(single_client).generate_sequences(_batch(UIDS))

    assert sorted(grouped_client.calls, key=str) == sorted(
        [
            ("generate_group", ["step3-row10", "step3-row12", "step3-row15"], "a"),
            ("generate_group", ["step3-row11", "step3-row14"], "b"),
            ("generate_group", ["step3-row13"], None),  # a row without a key is a group of one
            ("generate_group", ["step3-row16"], None),
        ],
        key=str,
    )
    assert [c[0] for c in single_client.calls] == ["generate"] * len(UIDS)
    assert list(grouped.non_tensor_batch["request_id"]) == [f"step3-row{10 + i}" for i in range(len(UIDS))]
    assert list(grouped.non_tensor_batch["uid"]) == UIDS
    for key in sorted(single.batch.keys()):  # same per-row seeds, so the same outputs in the same rows
        assert torch.equal(grouped.batch[key], single.batch[key]), key
    assert len(set(grouped.batch["sigmas"][:, 0].tolist())) == len(UIDS)  # every row has its own seed


async def test_an_agent_loop_without_run_group_gets_one_call_per_row():
    client = StubClient(dispatches_groups=True)
    out = await _worker(client).generate_sequences(_batch(UIDS, agent=SINGLE_ONLY_AGENT))
    assert [c[0] for c in client.calls] == ["generate"] * len(UIDS)
    assert list(out.non_tensor_batch["uid"]) == UIDS


async def test_run_group_rejects_rows_of_several_keys():
    worker = _worker(StubClient(dispatches_groups=True))
    loop = worker._agent_loop("diffusion_single_turn_agent")
    rows = [({"seed": 0}, {"prompt": "p", "uid": u, "request_id": f"r{u}"}) for u in ("a", "b")]
    with pytest.raises(ValueError, match=r"one routing key, got \['a', 'b'\]"):
        await loop.run_group(rows)
