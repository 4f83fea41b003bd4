"""Server manager and client that carry a per-group ``routing_key`` to the load balancer.

verl's ``LLMServerClient.generate`` forwards every extra kwarg both to the balancer (filtered by
``require_acquire_fields``) and to the server, and replaces the caller's ``request_id`` with a
fresh uuid. ``OmniLLMServerClient`` keeps verl's request path but sends ``routing_key`` to the
balancer only and forwards the caller's ``request_id`` so a request can be traced end to end. Its
``generate_group`` sends a whole GRPO group to one replica in one call (strict affinity puts it on one
replica anyway): one acquire, one server call and one release instead of one of each per copy.
"""

from __future__ import annotations

import contextvars
import logging
import os
from dataclasses import fields
from typing import Any

import ray
from verl.utils.ray_utils import auto_await
from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

from verl_omni.workers.config.rollout import ensure_omni_rollout_target
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

# The routing key of the generate() call running in the current asyncio task. A context variable
# (copied per task) lets verl's own generate() run unchanged while the key reaches only the
# balancer; concurrent calls never see each other's key.
_ROUTING_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("verl_omni_routing_key", default=None)
# The server id the current generate() attempt was given, so a dead replica can be dropped.
_ACQUIRED: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("verl_omni_acquired", default=None)

# Errors that mean the replica itself is gone (not that the request was bad).
_REPLICA_GONE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)


class OmniLLMServerClient(LLMServerClient):
    """verl's client plus a ``routing_key`` for the balancer, caller-id forwarding, and failover.

    Args:
        max_replica_failures: how many dead replicas one request (or group) may meet before it fails. A
            replica whose actor died is removed from the balancer and the request is sent again (same
            request id and sampling params, so the same seed), so a lost replica loses no samples.
        dispatches_groups: tells callers to send a group's copies with :meth:`generate_group` (set by
            ``OmniLLMServerManager`` from ``server_routing``: strict affinity with ``group_dispatch``).
    """

    def __init__(
        self,
        config: Any,
        load_balancer_handle: Any = None,
        max_replica_failures: int = 2,
        dispatches_groups: bool = False,
        **kwargs: Any,
    ):
        super().__init__(config=config, load_balancer_handle=load_balancer_handle, **kwargs)
        self.max_replica_failures = max_replica_failures
        self.dispatches_groups = dispatches_groups

    async def generate(self, request_id: str, *, routing_key: str | None = None, **kwargs: Any) -> Any:
        """Generate through the replica the balancer picks for ``routing_key`` (or ``request_id``).

        ``routing_key`` is consumed here and never sent to the server; the replica is released in
        ``finally`` (by verl's generate), also when the server raises.
        """
        token = _ROUTING_KEY.set(routing_key)
        failures = 0
        try:
            while True:
                acquired: list[str] = []
                acquired_token = _ACQUIRED.set(acquired)
                try:
                    return await super().generate(request_id, **kwargs)
                except _REPLICA_GONE:
                    failures += 1
                    if not acquired or failures > self.max_replica_failures:
                        raise
                    logger.warning("replica %s is gone; removing it and retrying %s", acquired[-1], request_id)
                    await self._load_balancer.remove_servers.remote([acquired[-1]])
                finally:
                    _ACQUIRED.reset(acquired_token)
        finally:
            _ROUTING_KEY.reset(token)

    async def generate_group(self, requests: list[dict[str, Any]], *, routing_key: str | None = None) -> list[Any]:
        """Generate several requests on one replica: one acquire, one server call, one release.

        Each entry holds the server's ``generate`` arguments (``request_id``, ``prompt_ids``,
        ``sampling_params``); outputs come back in the same order. The balancer picks once (for the
        first request id and ``routing_key``) and counts all ``len(requests)`` in flight, so other
        requests' load-aware picks see the group's full weight. Needs a balancer whose
        ``acquire_server``/``release_server`` take ``count`` and a server with ``generate_group``.
        A dead replica is removed and the whole group resent (same request ids and sampling params).
        """
        if not requests:
            return []
        count = len(requests)
        lead = str(requests[0]["request_id"])
        sent = [{**r, "request_id": self._vllm_request_id(str(r["request_id"]))} for r in requests]
        failures = 0
        while True:
            server_id, server = await self._load_balancer.acquire_server.remote(
                request_id=lead, routing_key=routing_key, count=count
            )
            try:
                outputs = await server.generate_group.remote(requests=sent)
            except _REPLICA_GONE:
                failures += 1
                if failures > self.max_replica_failures:
                    raise
                logger.warning("replica %s is gone; removing it and resending group %s", server_id, routing_key or lead)
                await self._load_balancer.remove_servers.remote([server_id])
                continue
            finally:
                # fire-and-forget, as verl releases; a removed replica's release is ignored by the balancer
                self._load_balancer.release_server.remote(server_id=server_id, count=count)
            for output in outputs:  # as verl's generate does for each output
                global_steps = output.extra_fields.get("global_steps")
                output.extra_fields.setdefault("min_global_steps", global_steps)
                output.extra_fields.setdefault("max_global_steps", global_steps)
            return outputs

    async def _acquire_server(self, request_id: str, **extra: Any) -> tuple[str, ray.actor.ActorHandle]:
        routing_key = _ROUTING_KEY.get()
        if routing_key is not None:
            extra["routing_key"] = routing_key
        server_id, handle = await super()._acquire_server(request_id, **extra)
        acquired = _ACQUIRED.get()
        if acquired is not None:
            acquired.append(server_id)
        return server_id, handle

    def _vllm_request_id(self, request_id: str) -> str:
        """Forward the caller's id so server logs and traces match the agent loop's request."""
        return request_id


class OmniLLMServerManager(LLMServerManager):
    """verl's server manager with ``OmniRequestLoadBalancer`` configured from ``rollout.server_routing``.

    The routing section is validated in the constructor, before any replica is launched.
    """

    def __init__(self, config: Any, *args: Any, load_balancer_cls: type | None = None, **kwargs: Any):
        rollout_config = config.actor_rollout_ref.rollout
        ensure_omni_rollout_target(rollout_config)
        self.routing_config = RolloutServerRoutingConfig.from_config(
            rollout_config.get("server_routing"), prefix="actor_rollout_ref.rollout.server_routing"
        )
        super().__init__(config, *args, load_balancer_cls=load_balancer_cls or OmniRequestLoadBalancer, **kwargs)

    async def _init_global_load_balancer(self) -> None:
        cfg = self.routing_config
        if getattr(self.rollout_config, "router_config_path", None):
            logger.warning(
                "rollout.router_config_path=%r is ignored: routing is set by rollout.server_routing",
                self.rollout_config.router_config_path,
            )
        servers = dict(zip(self.server_addresses, self.server_handles, strict=True))
        self.global_load_balancer = ray.remote(self._load_balancer_cls).remote(
            servers=servers,
            max_cache_size=cfg.cache_size,
            full_determinism=bool(getattr(self.rollout_config, "full_determinism", False)),
            policy=cfg.policy,
            max_imbalance=cfg.max_imbalance,
        )
        logger.info(
            "Rollout routing: policy=%s max_imbalance=%s cache_size=%d over %d replicas",
            cfg.policy,
            cfg.max_imbalance,
            cfg.cache_size,
            len(servers),
        )

    @auto_await
    async def set_routing(self, **overrides: Any) -> None:
        """Swap in a new balancer with changed routing options, over the same replicas.

        For comparing policies on one set of warm replicas (benchmarks, tests) without relaunching
        them. Clients handed out before keep the old balancer: call :meth:`get_client` again.
        """
        current = {f.name: getattr(self.routing_config, f.name) for f in fields(self.routing_config)}
        current.pop("_target_", None)
        self.routing_config = RolloutServerRoutingConfig.from_config(
            {**current, **overrides}, prefix="actor_rollout_ref.rollout.server_routing"
        )
        await self._init_global_load_balancer()

    def get_client(self, client_cls: type[LLMServerClient] | None = None, **kwargs: Any) -> LLMServerClient:
        """An ``OmniLLMServerClient`` told whether to dispatch groups; any verl client class can still be passed."""
        client_cls = client_cls or OmniLLMServerClient
        if issubclass(client_cls, OmniLLMServerClient):
            kwargs.setdefault("dispatches_groups", self.routing_config.dispatches_groups)
        return super().get_client(client_cls=client_cls, **kwargs)
