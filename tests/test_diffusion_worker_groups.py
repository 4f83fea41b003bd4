"""How ``DiffusionAgentLoopWorker`` sends rows to the client: one call per routing key, under every policy.

In-process, with a stub client that records its calls: the worker's grouping, row order, request ids
and seeds, without Ray or a model (the real path runs in tests/integration/test_diffusion_routing.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.protocol import DataProto

from verl_omni.agent_loop import DiffusionAgentLoopWorker
from verl_omni.protocol import CONDITIONING, NOISE, Sample, SampleGroup, stack_samples
from verl_omni.trainer.flowgrpo.rollout_batch import ROW_SAMPLING_PARAMS
from verl_omni.utils.arrays import object_column
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig


class StubClient:
    """Returns an output whose image encodes the request's seed; records every call."""

    def __init__(self, routing_key_field: str = "uid"):
        self.routing = RolloutServerRoutingConfig(routing_key_field=routing_key_field)
        self.calls: list[tuple[str, list[str], str | None]] = []

    @staticmethod
    def _output(request_id: str, prompt: str, sampling_params: dict[str, Any]) -> Sample:
        seed = sampling_params["seed"]
        t = torch.full((2,), float(seed), dtype=torch.float64)  # exact for any seed
        return Sample(
            request_id=request_id,
            image=torch.full((3, 2, 2), seed % 256, dtype=torch.uint8),
            latents=torch.cat([t, t[:1]]).view(3, 1, 1, 1),
            sigmas=torch.cat([t, t[:1]]),
            log_probs=t,
            noise=t.view(2, 1, 1, 1) + 0.5 if sampling_params.get("record_noise") else None,
            conditioning=prompt,
            extra_fields={"server_id": "stub", "batch_size": 1, "cache_hit": False, "generate_s": 0.0},
        )

    async def generate_group(self, requests, *, routing_key=None):
        self.calls.append(("generate_group", [r["request_id"] for r in requests], routing_key))
        samples = [self._output(r["request_id"], r["prompt_ids"], r["sampling_params"]) for r in requests]
        # the group's conditioning once per distinct prompt, as a replica returns it
        conditioning = {r["prompt_ids"]: {"embeds": torch.full((2,), float(len(r["prompt_ids"])))} for r in requests}
        return SampleGroup(samples=samples, conditioning=conditioning)


def _worker(client: StubClient) -> DiffusionAgentLoopWorker:
    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {}}, "trainer": {"seed": 0}})
    return DiffusionAgentLoopWorker(config, client)


def _batch(uids: list[str | None], agent: str | None = None, row_params: list[dict] | None = None) -> DataProto:
    non_tensors = {
        "prompt": object_column([f"prompt of {u}" for u in uids]),
        "uid": object_column(uids),
        "row_index": np.arange(10, 10 + len(uids)),
    }
    if row_params is not None:
        non_tensors[ROW_SAMPLING_PARAMS] = object_column(row_params)
    if agent is not None:
        non_tensors["agent_name"] = object_column([agent] * len(uids))
    return DataProto.from_dict(non_tensors=non_tensors, meta_info={"global_steps": 3, "seed": 7})


UIDS = ["a", "b", "a", None, "b", "a", None]


async def test_rows_of_a_key_go_out_in_one_call_and_come_back_in_row_order():
    client = StubClient()
    grouped = await _worker(client).generate_sequences(_batch(UIDS))

    assert sorted(client.calls, key=str) == sorted(
        [
            ("generate_group", ["step3-row10", "step3-row12", "step3-row15"], "a"),
            ("generate_group", ["step3-row11", "step3-row14"], "b"),
            ("generate_group", ["step3-row13"], None),  # a row without a key is a group of one
            ("generate_group", ["step3-row16"], None),
        ],
        key=str,
    )
    assert list(grouped.non_tensor_batch["request_id"]) == [f"step3-row{10 + i}" for i in range(len(UIDS))]
    assert list(grouped.non_tensor_batch["uid"]) == UIDS
    # what co-location is measured on: the key each row was routed by (its request id when it had none)
    assert list(grouped.non_tensor_batch["routing_key"]) == ["a", "b", "a", "step3-row13", "b", "a", "step3-row16"]
    assert len(set(grouped.batch["sigmas"][:, 0].tolist())) == len(UIDS)  # every row has its own seed
    # one conditioning entry per distinct prompt, each row pointing at its prompt's
    table = grouped.meta_info[CONDITIONING]
    prompts = list(grouped.non_tensor_batch["prompt"])
    assert len(table) == len(set(prompts)) == 3  # two groups of one share the prompt "prompt of None"
    for row, prompt in enumerate(prompts):
        entry = table[int(grouped.batch["conditioning_index"][row])]
        assert torch.equal(entry["embeds"], torch.full((2,), float(len(prompt))))
    assert grouped.batch["negative_conditioning_index"].tolist() == [-1] * len(UIDS)


async def test_routing_key_field_other_than_uid_groups_by_that_field():
    client = StubClient(routing_key_field="prompt")
    batch = _batch(["a", "b", "c", "d"])
    batch.non_tensor_batch["prompt"] = object_column(["same", "other", "same", "other"])
    out = await _worker(client).generate_sequences(batch)
    assert sorted((c[2], c[1]) for c in client.calls) == [
        ("other", ["step3-row11", "step3-row13"]),
        ("same", ["step3-row10", "step3-row12"]),
    ]
    assert list(out.non_tensor_batch["routing_key"]) == ["same", "other", "same", "other"]


async def test_a_routing_key_field_missing_from_the_batch_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"routing_key_field='group'.*not a field of the batch.*'prompt'"):
        await _worker(StubClient(routing_key_field="group")).generate_sequences(_batch(UIDS))


async def test_rows_that_ask_for_their_noise_get_it_stacked_beside_their_latents():
    """The trainer's one_step_off rows send ``record_noise``: each row's draws come back in the batch under ``noise``,
    in row order; a batch mixing rows with and without noise is refused (the update re-centres all rows or none)."""
    client = StubClient()
    out = await _worker(client).generate_sequences(_batch(UIDS, row_params=[{"record_noise": True}] * len(UIDS)))
    seeds = out.batch["latents"][:, 0, 0, 0, 0]
    assert out.batch[NOISE].shape == (len(UIDS), 2, 1, 1, 1)
    assert torch.equal(out.batch[NOISE][:, 0, 0, 0, 0], seeds + 0.5)

    plain = await _worker(StubClient()).generate_sequences(_batch(UIDS))
    assert NOISE not in plain.batch

    with_noise = StubClient._output("r0", "p", {"seed": 1, "record_noise": True})
    without = StubClient._output("r1", "p", {"seed": 2})
    with pytest.raises(ValueError, match="1 of 2 samples carry their SDE noise"):
        stack_samples([with_noise, without], [{}, {}])
