"""``OmniAgentLoopManager``: verl's agent-loop manager for diffusion rollouts, with routing metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopManager
from verl.protocol import DataProto
from verl.utils.ray_utils import auto_await

from verl_omni.agent_loop.diffusion_worker import DiffusionAgentLoopWorker
from verl_omni.agent_loop.routing_metrics import routing_metrics


class OmniAgentLoopManager(AgentLoopManager):
    """Splits a batch over ``DiffusionAgentLoopWorker`` actors and reports how requests were routed.

    Workers are light (they only await the rollout client), so they ask Ray for a fraction of a
    CPU: the replicas and the trainer are where the compute goes.
    """

    agent_loop_workers_class = ray.remote(num_cpus=0.01)(DiffusionAgentLoopWorker)

    def __init__(self, config: Any, llm_client: Any, *args: Any, **kwargs: Any):
        super().__init__(config, llm_client, *args, **kwargs)
        self._last_diversions = 0

    @auto_await
    async def set_client(self, llm_client: Any) -> None:
        """Point every worker at another client (e.g. after ``OmniLLMServerManager.set_routing``)."""
        self.llm_client = llm_client
        self._last_diversions = 0
        await asyncio.gather(*[worker.set_client.remote(llm_client) for worker in self.agent_loop_workers])

    @auto_await
    async def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Chunk over workers, concatenate, and attach routing metrics to ``meta_info['metrics']``.

        verl's version also computes LLM token metrics from ``output.batch['prompts']``, which a
        diffusion batch does not have; timing here is per call and per worker instead.
        """
        start = time.perf_counter()
        chunks = prompts.chunk(len(self.agent_loop_workers))
        outputs = await asyncio.gather(
            *[
                worker.generate_sequences.remote(chunk)
                for worker, chunk in zip(self.agent_loop_workers, chunks, strict=True)
            ]
        )
        # per-worker timing differs between chunks; DataProto.concat requires equal meta_info
        worker_times = [o.meta_info.pop("worker_generate_s", 0.0) for o in outputs]
        output = DataProto.concat(outputs)
        elapsed = time.perf_counter() - start

        metrics = await self._routing_metrics(output)
        metrics["timing_s/agent_loop/generate_sequences"] = elapsed
        metrics["timing_s/agent_loop/slowest_worker"] = max(worker_times)
        output.meta_info = {**outputs[0].meta_info, "metrics": metrics}
        return output

    async def _routing_metrics(self, output: DataProto) -> dict[str, float]:
        nt = output.non_tensor_batch
        balancer = getattr(self.llm_client, "_load_balancer", None)
        all_servers, diversions = None, None
        if balancer is not None:
            status = await balancer.get_status.remote()
            all_servers = status.get("registered_handles")
            if "diversions" in status:
                diversions = status["diversions"] - self._last_diversions
                self._last_diversions = status["diversions"]
        routing_cfg = self.rollout_config.get("server_routing") or {}
        key_field = routing_cfg.get("routing_key_field", "uid")
        group_ids = nt[key_field] if key_field in nt else nt["request_id"]
        return routing_metrics(
            group_ids=list(group_ids),
            servers=list(nt["rollout_server"]),
            all_servers=all_servers,
            batch_sizes=[b for b in nt["rollout_batch_size"] if b is not None],
            cache_hits=[c for c in nt["rollout_cache_hit"] if c is not None],
            diversions=diversions,
        )
