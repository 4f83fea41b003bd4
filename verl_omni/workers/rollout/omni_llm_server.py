"""Server manager and client that carry a per-group ``routing_key`` to the load balancer.

One request path for every policy: the client hands the balancer a whole group (a group of one when
there is no group structure) with its routing key in one ``acquire_group`` call, gets back a placement
(replica -> copies), makes one ``generate_group`` call per replica used and one ``release_group`` call.
A FlowGRPO group of ``n`` copies costs two balancer calls instead of ``2 n``. The caller's
``request_id`` is forwarded, so a request can be traced end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import uuid
from typing import Any

import ray
from verl.utils.ray_utils import auto_await
from verl.workers.rollout.llm_server import LLMServerClient, LLMServerManager

from verl_omni.protocol import Sample, SampleGroup
from verl_omni.utils.ray_actor import ACTOR_GONE
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.rollout import ensure_omni_rollout_target
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.backends import register_rollout_backends
from verl_omni.workers.rollout.request_routing import BalancerRestarted, OmniRequestLoadBalancer

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

register_rollout_backends()  # the manager below looks replicas up by rollout.name

# Restarts of the balancer and agent-loop worker actors (bounded: a process that dies on start-up every time
# must end the run, not loop).
ACTOR_RESTARTS = 3


class OmniLLMServerClient(LLMServerClient):
    """verl's client with group placement, caller-id forwarding and failover.

    Args:
        routing: the manager's routing config (tells agent-loop workers which field is the routing key).
        max_replica_failures: how many dead replicas one group may meet before it fails. A dead replica is
            removed from the balancer and only the copies it held are placed again (same request ids and
            sampling params, so the same seeds): a lost replica loses no samples. Resent outputs carry
            ``extra_fields["resent"] = True``.

    Every acquire is a lease (an id unique to this client's process) that the client keeps until it releases
    it. When Ray restarts the balancer, the new one knows none of them: the client sends its outstanding
    leases (:meth:`OmniRequestLoadBalancer.restore_leases`) before its next acquire (the balancer refuses an
    acquire that names its previous incarnation) or as soon as a release answers with a new incarnation,
    so in-flight counts and the pins of keys in flight come back, and late releases of unrestored leases
    are ignored instead of taking load off requests placed since.
    """

    def __init__(
        self,
        config: Any,
        load_balancer_handle: Any = None,
        routing: RolloutServerRoutingConfig | None = None,
        max_replica_failures: int = 2,
        **kwargs: Any,
    ):
        super().__init__(config=config, load_balancer_handle=load_balancer_handle, **kwargs)
        self.routing = routing or RolloutServerRoutingConfig()
        self.max_replica_failures = max_replica_failures
        self.owner: str | None = None  # set by the agent-loop worker holding this client (its actor name)
        self._incarnation: str | None = None  # the balancer life this client's leases are counted in
        self._reset_leases()

    def _reset_leases(self) -> None:
        """Lease state belongs to one process: set on first use there (a client is pickled to every worker)."""
        self._lease_prefix: str | None = None
        self._lease_ids: Any = None
        self._outstanding: dict[str, tuple[str | None, list[tuple[str, Any, int]]]] = {}
        self._restoring: asyncio.Lock | None = None
        self._watchers: set[asyncio.Future] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_lease_prefix", "_lease_ids", "_outstanding", "_restoring", "_watchers", "_incarnation"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._incarnation = None
        self._reset_leases()

    async def adopt(self, owner: str, restarted: bool) -> int:
        """Acquire on behalf of ``owner`` from now on; a restarted owner first frees what it held before dying."""
        self.owner = owner
        return await self._load_balancer.release_owner.remote(owner) if restarted else 0

    async def generate(self, request_id: str, *, routing_key: str | None = None, **kwargs: Any) -> SampleGroup:
        """One request: a group of one (``kwargs`` are the server's ``generate`` arguments)."""
        return await self.generate_group([{"request_id": request_id, **kwargs}], routing_key=routing_key)

    async def generate_group(self, requests: list[dict[str, Any]], *, routing_key: str | None = None) -> SampleGroup:
        """Generate the copies of one group: one acquire, one server call per replica used, one release.

        Each entry holds the server's ``generate`` arguments (``request_id``, ``prompt_ids``,
        ``sampling_params``); the samples come back in the same order, with the conditioning of the replicas
        used merged. ``routing_key`` goes to the balancer only. Copies on a replica that died are placed again
        (on the replicas left) after it is removed.
        """
        parts: list[SampleGroup] = []
        where: list[tuple[int, int] | None] = [None] * len(requests)  # (part, sample) of each request
        pending = list(range(len(requests)))
        failures = 0
        while pending:
            lease, placement = await self._acquire([str(requests[i]["request_id"]) for i in pending], routing_key)
            try:
                results = await asyncio.gather(
                    *(
                        server.generate_group.remote(requests=[self._sent(requests[pending[j]]) for j in copies])
                        for _, server, copies in placement
                    ),
                    return_exceptions=True,
                )
            finally:
                self._release(lease, placement)
            gone, retry = [], []
            for (server_id, _, copies), result in zip(placement, results, strict=True):
                if isinstance(result, ACTOR_GONE):
                    gone.append(server_id)
                    retry += [pending[j] for j in copies]
                elif isinstance(result, BaseException):
                    raise result
                else:
                    for s, (j, sample) in enumerate(zip(copies, result.samples, strict=True)):
                        self._finish(sample, resent=failures > 0)
                        where[pending[j]] = (len(parts), s)
                    parts.append(result)
            if gone:
                failures += len(gone)
                if failures > self.max_replica_failures:
                    raise RuntimeError(
                        f"group {routing_key or requests[0]['request_id']!r} met {failures} dead replicas "
                        f"(max_replica_failures={self.max_replica_failures}); last: {gone}"
                    ) from next(r for r in results if isinstance(r, ACTOR_GONE))
                logger.warning("replica(s) %s gone; removing them and resending %d copies", gone, len(retry))
                await self._load_balancer.remove_servers.remote(gone)
            pending = retry
        return SampleGroup.gather(parts, where)

    async def _acquire(self, request_ids: list[str], routing_key: str | None) -> tuple[str, list]:
        """One ``acquire_group`` under a new lease, kept as outstanding until :meth:`_release`.

        The acquire names the balancer incarnation this client's leases are counted in; a restarted balancer
        refuses it, the client restores its leases there and acquires again (Ray restarts the balancer a bounded
        number of times, so this ends).
        """
        if self._lease_prefix is None:
            self._lease_prefix, self._lease_ids = uuid.uuid4().hex[:16], itertools.count()
        lease = f"{self._lease_prefix}-{next(self._lease_ids)}"
        while True:
            if self._incarnation is None:
                await self._restore(None)
            known = self._incarnation
            try:
                placement = await self._load_balancer.acquire_group.remote(
                    request_ids=request_ids, routing_key=routing_key, owner=self.owner, lease=lease, incarnation=known
                )
            except BalancerRestarted:
                await self._restore(known)
                continue
            self._outstanding[lease] = (routing_key, [(sid, server, len(copies)) for sid, server, copies in placement])
            return lease, placement

    def _release(self, lease: str, placement: list) -> None:
        """Release fire-and-forget (as verl does); the answer, read in the background, reveals a restart."""
        self._outstanding.pop(lease, None)
        ref = self._load_balancer.release_group.remote(
            [(sid, len(copies)) for sid, _, copies in placement], owner=self.owner, lease=lease
        )
        watcher = asyncio.ensure_future(self._after_release(ref, self._incarnation))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _after_release(self, ref: Any, sent_in: str | None) -> None:
        try:
            incarnation = await ref
        except Exception as err:  # the balancer is gone for good: the next acquire reports it
            logger.warning("release to the load balancer failed: %s", err)
            return
        if incarnation != sent_in and sent_in is not None:
            await self._restore(sent_in)

    async def _restore(self, stale: str | None) -> None:
        """Send every outstanding lease to the balancer (once per incarnation, however many callers noticed)."""
        if self._restoring is None:
            self._restoring = asyncio.Lock()
        async with self._restoring:
            if self._incarnation != stale:  # restored by another caller meanwhile
                return
            leases = [(lease, key, parts) for lease, (key, parts) in self._outstanding.items()]
            self._incarnation = await self._load_balancer.restore_leases.remote(leases, owner=self.owner)
            if stale is not None:
                logger.warning("load balancer restarted: %d leases in flight restored", len(leases))

    def _sent(self, request: dict[str, Any]) -> dict[str, Any]:
        return {**request, "request_id": self._vllm_request_id(str(request["request_id"]))}

    @staticmethod
    def _finish(sample: Sample, resent: bool) -> None:
        """verl's per-output bookkeeping, plus whether the copy was resent after a replica loss."""
        global_steps = sample.extra_fields.get("global_steps")
        sample.extra_fields.setdefault("min_global_steps", global_steps)
        sample.extra_fields.setdefault("max_global_steps", global_steps)
        sample.extra_fields["resent"] = resent

    def _vllm_request_id(self, request_id: str) -> str:
        """Forward the caller's id so server logs and traces match the agent loop's request."""
        return request_id


class OmniLLMServerManager(LLMServerManager):
    """verl's server manager with ``OmniRequestLoadBalancer`` configured from ``rollout.server_routing``.

    The routing section is read and validated once, here, before any replica is launched; the typed
    config then goes to the balancer and to every client (which hands ``routing_key_field`` to the
    agent-loop workers).
    """

    def __init__(
        self,
        config: Any,
        *args: Any,
        routing: RolloutServerRoutingConfig | None = None,
        diffusion: DiffusionRolloutConfig | None = None,
        load_balancer_cls: type | None = None,
        **kwargs: Any,
    ):
        rollout_config = config.actor_rollout_ref.rollout
        ensure_omni_rollout_target(rollout_config)
        # The sections the driver parsed (the recipe passes them); without them they are read here, on the driver,
        # so a bad value is named before any replica starts (a replica reads what verl's conversion parsed).
        self.routing_config = routing or RolloutServerRoutingConfig.from_config(rollout_config.get("server_routing"))
        if diffusion is None:
            DiffusionRolloutConfig.from_config(rollout_config.get("diffusion"))
        load_balancer_cls = load_balancer_cls or OmniRequestLoadBalancer
        if not callable(getattr(load_balancer_cls, "acquire_group", None)):
            raise TypeError(
                f"load_balancer_cls={load_balancer_cls.__name__} has no acquire_group(): the client places whole "
                "groups; pass OmniRequestLoadBalancer or a subclass"
            )
        super().__init__(config, *args, load_balancer_cls=load_balancer_cls, **kwargs)

    @classmethod
    @auto_await
    async def create(cls, *args: Any, wait_loaded: bool = True, **kwargs: Any) -> OmniLLMServerManager:
        """verl's ``create``: the replicas, then the balancer over them. With ``wait_loaded=False`` it returns while
        the replicas load their models, so the caller can start other actors meanwhile, and calls
        :meth:`wait_loaded` before it needs them."""
        instance = cls(*args, **kwargs)
        await instance._initialize_llm_servers()
        await instance._init_global_load_balancer()
        if wait_loaded:
            await instance.wait_loaded()
        return instance

    @auto_await
    async def wait_loaded(self) -> None:
        """Return once every replica's server actor is constructed (a diffusion server loads its model in its
        constructor); a server that failed to start raises here."""
        await asyncio.gather(*(handle.__ray_ready__.remote() for handle in self.server_handles))

    async def _init_global_load_balancer(self) -> None:
        cfg = self.routing_config
        if getattr(self.rollout_config, "router_config_path", None):
            logger.warning(
                "rollout.router_config_path=%r is ignored: routing is set by rollout.server_routing",
                self.rollout_config.router_config_path,
            )
        servers = dict(zip(self.server_addresses, self.server_handles, strict=True))
        # Restarted by Ray if its process dies (from these arguments: the replicas it started with; a dead one is
        # dropped again by the first client that meets it), and calls in flight are retried on the new one.
        self.global_load_balancer = (
            ray.remote(self._load_balancer_cls)
            .options(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)
            .remote(
                servers=servers,
                max_cache_size=cfg.cache_size,
                full_determinism=bool(getattr(self.rollout_config, "full_determinism", False)),
                routing=cfg,
            )
        )
        logger.info("Rollout routing over %d replicas: %s", len(servers), cfg.as_dict())

    @auto_await
    async def set_routing(self, **overrides: Any) -> None:
        """Swap in a new balancer with changed routing options, over the same replicas.

        For comparing policies on one set of warm replicas (benchmarks, tests) without relaunching
        them. Clients handed out before keep the old balancer: call :meth:`get_client` again.
        """
        self.routing_config = dataclasses.replace(self.routing_config, **overrides)  # checked like the YAML
        await self._init_global_load_balancer()

    def get_client(self, client_cls: type[LLMServerClient] | None = None, **kwargs: Any) -> LLMServerClient:
        """An ``OmniLLMServerClient`` carrying the routing config; any verl client class can still be passed."""
        client_cls = client_cls or OmniLLMServerClient
        if issubclass(client_cls, OmniLLMServerClient):
            kwargs.setdefault("routing", self.routing_config)
        return super().get_client(client_cls=client_cls, **kwargs)
