"""``OmniAgentLoopManager``: verl's agent-loop manager for diffusion rollouts, with routing metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from uuid import uuid4

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.experimental.agent_loop.agent_loop import AgentLoopManager
from verl.protocol import DataProto
from verl.utils.ray_utils import auto_await

from verl_omni.agent_loop.diffusion_agent_loop import missing_routing_key_field
from verl_omni.agent_loop.diffusion_worker import DiffusionAgentLoopWorker
from verl_omni.agent_loop.routing_metrics import routing_metrics
from verl_omni.protocol import CONDITIONING, merge_tables
from verl_omni.workers.rollout.omni_llm_server import ACTOR_RESTARTS


class OmniAgentLoopManager(AgentLoopManager):
    """Splits a batch over ``DiffusionAgentLoopWorker`` actors and reports how requests were routed.

    Workers are light (they only await the rollout client), so they ask Ray for a fraction of a
    CPU: the replicas and the trainer are where the compute goes.
    """

    # A worker whose process dies is restarted and its batch chunk re-run there (same rows, same seeds, same
    # samples); the restarted worker first frees the requests its lost run held at the balancer.
    agent_loop_workers_class = ray.remote(num_cpus=0.01, max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(
        DiffusionAgentLoopWorker
    )

    def __init__(self, config: Any, llm_client: Any, *args: Any, **kwargs: Any):
        super().__init__(config, llm_client, *args, **kwargs)
        self._last_diversions = 0

    async def _init_agent_loop_workers(self) -> None:
        """verl's round-robin over the nodes with CPUs, from the driver's node.

        verl starts at ``ray.nodes()``'s order, which changes from run to run, and pins each worker with a soft
        node affinity, which waits on a node whose CPUs are taken instead of moving. From the driver's node,
        worker 0 lands in the same place every run, on the node the run cannot lose anyway.
        """
        driver = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        nodes.sort(key=lambda node: node != driver)  # stable: the others keep verl's order
        self.agent_loop_workers = [
            self.agent_loop_workers_class.options(
                name=f"agent_loop_worker_{i}_{uuid4().hex[:8]}",
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=True),
            ).remote(self.config, self.llm_client, self.teacher_client, self.reward_loop_worker_handles)
            for i in range(self.rollout_config.agent.num_workers)
        ]

    @auto_await
    async def set_client(self, llm_client: Any) -> None:
        """Point every worker at another client (e.g. after ``OmniLLMServerManager.set_routing``)."""
        self.llm_client = llm_client
        self._last_diversions = 0
        await asyncio.gather(*[worker.set_client.remote(llm_client) for worker in self.agent_loop_workers])

    @auto_await
    async def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Split over workers at group boundaries, concatenate, and attach routing metrics to ``meta_info['metrics']``.

        A group's rows stay in one worker where the split allows, so the balancer places each group in one
        call; the split never changes a sample (seeds come from global row indices).

        verl's version also computes LLM token metrics from ``output.batch['prompts']``, which a
        diffusion batch does not have; timing here is per call and per worker instead.
        """
        start = time.perf_counter()
        field = self.llm_client.routing.routing_key_field
        keys = prompts.non_tensor_batch.get(field)
        if keys is None:
            raise missing_routing_key_field(field, prompts.non_tensor_batch)
        bounds = group_aligned_bounds(list(keys), len(self.agent_loop_workers))
        outputs = await asyncio.gather(
            *[
                worker.generate_sequences.remote(prompts.slice(lo, hi))
                for worker, lo, hi in zip(self.agent_loop_workers, bounds, bounds[1:], strict=False)
                if hi > lo
            ]
        )
        # per-worker timing differs between chunks; DataProto.concat requires equal meta_info
        worker_times = [o.meta_info.pop("worker_generate_s", 0.0) for o in outputs]
        exposed = [e for o in outputs if (e := o.meta_info.pop("reward_exposed_s", None)) is not None]
        table = merge_tables(outputs)  # each worker's conditioning entries, once
        output = DataProto.concat(outputs)
        elapsed = time.perf_counter() - start

        metrics = await self._routing_metrics(output)
        metrics["timing_s/agent_loop/generate_sequences"] = elapsed
        metrics["timing_s/agent_loop/slowest_worker"] = max(worker_times)
        if exposed:  # reward time no sampling hid, in the worker where it was longest
            metrics["timing_s/reward_exposed"] = max(exposed)
        output.meta_info = {**outputs[0].meta_info, CONDITIONING: table, "metrics": metrics}
        return output

    async def _routing_metrics(self, output: DataProto) -> dict[str, float]:
        nt = output.non_tensor_batch
        balancer = getattr(self.llm_client, "_load_balancer", None)
        all_servers, diversions, costs = None, None, None
        if balancer is not None:
            status = await balancer.get_status.remote()
            all_servers = status.get("registered_handles")
            costs = status.get("seconds_per_request")
            if "diversions" in status:
                diversions = status["diversions"] - self._last_diversions
                self._last_diversions = status["diversions"]
        group_ids = nt["routing_key"]  # the keys the rows were routed by, not the field the config names
        return routing_metrics(
            group_ids=list(group_ids),
            servers=list(nt["rollout_server"]),
            all_servers=all_servers,
            batch_sizes=[b for b in nt["rollout_batch_size"] if b is not None],
            cache_hits=[c for c in nt["rollout_cache_hit"] if c is not None],
            diversions=diversions,
            resent=int(sum(bool(r) for r in nt["rollout_resent"])),
            seconds_per_request=costs,
        )


def group_aligned_bounds(keys: list[Any], parts: int) -> list[int]:
    """``parts + 1`` row bounds splitting ``keys`` into contiguous chunks of near-equal size, cut only where
    the key changes (a chunk may be empty when there are fewer groups than parts)."""
    n = len(keys)
    cuts = [i for i in range(1, n) if keys[i] != keys[i - 1]] + [n]
    bounds = [0]
    for k in range(1, parts):
        target = k * n / parts
        cut = min(cuts, key=lambda c: (abs(c - target), c))
        bounds.append(max(cut, bounds[-1]))
    return [*bounds, n]
