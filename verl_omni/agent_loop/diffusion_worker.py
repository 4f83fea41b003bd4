"""``DiffusionAgentLoopWorker``: runs diffusion agent loops for a chunk of the batch on one Ray actor."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from verl_omni.utils.gc_pause import collector_paused

with collector_paused():  # verl's agent loop, torch, transformers: objects that all survive (verl_omni.utils.gc_pause)
    import hydra
    import numpy as np
    import ray
    import torch
    from omegaconf import DictConfig, OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker, DictConfigWrap, _agent_loop_registry
    from verl.protocol import DataProto

    from verl_omni.agent_loop.diffusion_agent_loop import (
        DIFFUSION_AGENT_NAME,
        DiffusionAgentLoopOutput,
        missing_routing_key_field,
        prompt_of,
    )
    from verl_omni.agent_loop.group_reward import reward_exposed_s, score_group
    from verl_omni.agent_loop.sampling import row_seed, sampling_params
    from verl_omni.protocol import CONDITIONING, stack_samples
    from verl_omni.rewards.weighted import WeightedReward
    from verl_omni.trainer.flowgrpo.rollout_batch import ROW_SAMPLING_PARAMS
    from verl_omni.utils.arrays import object_column
    from verl_omni.utils.ray_actor import restarted_actor

logger = logging.getLogger(__name__)


class DiffusionAgentLoopWorker(AgentLoopWorker):
    """Agent-loop worker for diffusion rollouts (and, when ``reward.name`` is set, per-sample rewards).

    verl's ``AgentLoopWorker.__init__`` loads an HF tokenizer/processor for the model path; a
    diffusers pipeline has its own, loaded by each replica, so this worker keeps verl's
    constructor signature (``AgentLoopManager`` passes the same positional arguments) and
    only what diffusion needs. Each row's seed comes from (base seed, global step, global row
    index), so how the batch is chunked over workers and replicas never changes a sample.

    The rows of one routing key (the client's ``routing.routing_key_field``) go out as one group, in one
    client call, under every policy; a row whose key is None is a group of its own.
    """

    def __init__(
        self,
        config: DictConfig,
        llm_client: Any,
        teacher_client: Any = None,
        reward_loop_worker_handles: list | None = None,
    ):
        self.config = config
        self.llm_client = llm_client
        self.teacher_client = teacher_client
        self.reward_loop_worker_handles = reward_loop_worker_handles
        self.rollout_config = config.actor_rollout_ref.rollout
        reward = config.get("reward")
        has_reward = reward is not None and (reward.get("name") is not None or reward.get("weights") is not None)
        self.reward_fn = WeightedReward.from_config(reward) if has_reward else None
        # Score each group as soon as its images are back (overlapping the other groups' sampling), or all groups
        # after the whole chunk is sampled (``reward.overlap: false``, the in-line baseline).
        self.reward_overlap = bool(reward.get("overlap", True)) if reward is not None else True
        self._adopted = False

    def set_client(self, llm_client: Any) -> None:
        """Route later requests through ``llm_client`` (a client of another balancer)."""
        self.llm_client = llm_client
        self._adopted = False

    async def _adopt_client(self) -> None:
        """Tell the client whose requests it sends (this actor's name); after a restart (Ray re-ran this
        worker because its process died) free what the previous incarnation still held at the balancer."""
        if self._adopted:
            return
        self._adopted = True
        restarted = restarted_actor()
        if restarted is None:
            return  # not a Ray actor (tests): no name to hold requests under
        freed = await self.llm_client.adopt(ray.get_runtime_context().get_actor_name(), restarted)
        if freed:
            logger.warning("agent-loop worker restarted: released %d requests its lost run held", freed)

    async def generate_sequences(self, batch: DataProto) -> DataProto:
        """Generate one image per row; returns tensors per sample plus routing/timing fields."""
        await self._adopt_client()
        meta = batch.meta_info
        validate = bool(meta.get("validate", False))
        global_step = int(meta.get("global_steps", 0))
        base_seed = int(meta.get("seed", self.config.get("trainer", {}).get("seed", 0) or 0))
        non_tensor = batch.non_tensor_batch
        n = len(batch)
        row_index = non_tensor.get("row_index", np.arange(n))
        agent_names = non_tensor.get("agent_name", np.array([DIFFUSION_AGENT_NAME] * n, dtype=object))
        row_params = non_tensor.get(ROW_SAMPLING_PARAMS)  # per-row sampling parameters (an algorithm's SDE window)

        start = time.perf_counter()
        shared_params = sampling_params(self.rollout_config, validate=validate)  # the replica applies the defaults
        field = self.llm_client.routing.routing_key_field
        if n and field not in non_tensor:
            raise missing_routing_key_field(field, non_tensor)
        groups: dict[tuple[str, Any], list[int]] = {}  # (agent loop, routing key) -> rows
        requests = []  # per row, as the server takes it: the one shape a request has
        for i in range(n):
            row = int(row_index[i])
            request_id = non_tensor["request_id"][i] if "request_id" in non_tensor else f"step{global_step}-row{row}"
            requests.append(
                {
                    "request_id": str(request_id),
                    "prompt_ids": prompt_of(non_tensor["prompt"][i]),
                    "sampling_params": {
                        **shared_params,
                        **(row_params[i] if row_params is not None else {}),
                        "seed": row_seed(base_seed, global_step, row),
                    },
                }
            )
            key = non_tensor[field][i]
            groups.setdefault((str(agent_names[i]), ("row", i) if key is None else str(key)), []).append(i)
        results = await self._run_groups(requests, groups)
        if self.reward_fn is not None and not self.reward_overlap:
            await self._score_in_line(results, [r["prompt_ids"] for r in requests])
        exposed = reward_exposed_s(results, time.perf_counter()) if self.reward_fn is not None else None
        elapsed = time.perf_counter() - start
        out = self._collate(results, non_tensor, meta, elapsed)
        out.meta_info["reward_exposed_s"] = exposed
        return out

    async def _score_in_line(self, results: list[DiffusionAgentLoopOutput], prompts: list[str]) -> None:
        """Score group after group once every group is sampled: the reward's whole time adds to the step."""
        groups: dict[str, list[int]] = {}
        for i, result in enumerate(results):
            groups.setdefault(result.routing_key or result.request_id, []).append(i)
        for rows in groups.values():
            await score_group(self.reward_fn, [results[i] for i in rows], [prompts[i] for i in rows])

    async def _run_groups(
        self, requests: list[dict[str, Any]], groups: dict[tuple[str, Any], list[int]]
    ) -> list[DiffusionAgentLoopOutput]:
        """One task per (agent loop, routing key): the client sends each group's rows in one call.

        Results land back in row order; a row whose key is None is a group of its own.
        """
        outputs = await asyncio.gather(
            *(
                self._agent_loop(name).run_group(
                    [requests[i] for i in rows], routing_key=None if isinstance(key, tuple) else key
                )
                for (name, key), rows in groups.items()
            )
        )
        results: list[Any] = [None] * len(requests)
        for rows, group_results in zip(groups.values(), outputs, strict=True):
            for i, result in zip(rows, group_results, strict=True):
                results[i] = result
        return results

    def _agent_loop(self, agent_name: str) -> Any:
        if agent_name not in _agent_loop_registry:
            raise ValueError(
                f"agent_name={agent_name!r} is not a registered agent loop; registered: {sorted(_agent_loop_registry)}"
            )
        return hydra.utils.instantiate(
            config=_agent_loop_registry[agent_name],
            trainer_config=DictConfigWrap(config=self.config),
            client=self.llm_client,
            tokenizer=None,
            processor=None,
            dataset_cls=None,
            data_config=DictConfigWrap(self.config.get("data", OmegaConf.create({}))),
            reward_fn=self.reward_fn if self.reward_overlap else None,
        )

    @staticmethod
    def _collate(
        results: list[DiffusionAgentLoopOutput],
        non_tensor: dict[str, np.ndarray],
        meta: dict[str, Any],
        elapsed: float,
    ) -> DataProto:
        samples = [r.sample for r in results]
        tensors, table = stack_samples(samples, [r.conditioning for r in results])
        if all(r.reward is not None for r in results):
            tensors["rewards"] = torch.tensor([r.reward for r in results], dtype=torch.float32)
            for name in results[0].reward_terms or {}:
                tensors[f"reward_terms.{name}"] = torch.tensor([r.reward_terms[name] for r in results])

        passthrough = {k: v for k, v in non_tensor.items() if k not in ("agent_name", "priority")}
        passthrough["request_id"] = object_column([r.request_id for r in results])
        # the key each row was routed by (its request id when it had none): what co-location is measured on
        passthrough["routing_key"] = object_column([r.routing_key or r.request_id for r in results])
        passthrough["rollout_resent"] = object_column([bool(o.extra_fields.get("resent")) for o in samples])
        passthrough["rollout_server"] = object_column([o.extra_fields.get("server_id") for o in samples])
        passthrough["rollout_batch_size"] = object_column([o.extra_fields.get("batch_size") for o in samples])
        passthrough["rollout_cache_hit"] = object_column([o.extra_fields.get("cache_hit") for o in samples])
        passthrough["rollout_generate_s"] = object_column([o.extra_fields.get("generate_s") for o in samples])
        passthrough["reward_s"] = object_column([r.reward_s for r in results])
        out_meta = {k: v for k, v in meta.items() if k != "metrics"}
        out_meta["worker_generate_s"] = elapsed
        out_meta[CONDITIONING] = table
        return DataProto.from_dict(tensors=tensors, non_tensors=passthrough, meta_info=out_meta)
