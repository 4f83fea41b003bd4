"""``OmniRequestLoadBalancer``: verl's rollout load balancer with group-aware routing policies.

In FlowGRPO every prompt is expanded into ``rollout.n`` requests that share a group id (``uid``).
verl's ``GlobalRequestLoadBalancer`` routes each request by its own ``request_id``, so a group
scatters over replicas. This balancer is a drop-in for it (same constructor arguments, methods
and status keys) that can route by a per-group ``routing_key`` instead.

Like verl's, it is a plain class: wrap it with ``ray.remote(...)`` at instantiation.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verl_omni.utils.lru import LRUMap
from verl_omni.utils.seeding import stable_int
from verl_omni.workers.config.rollout_routing import (
    DEFAULT_ROUTING_CACHE_SIZE,
    VALID_ROLLOUT_SERVER_ROUTING_POLICIES,
    RolloutServerRoutingConfig,
)
from verl_omni.workers.rollout.load_buckets import LoadBuckets
from verl_omni.workers.rollout.replica_speed import ReplicaSpeeds

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))
RESTART_PROBE_TIMEOUT_S = 10.0  # a restarted balancer waits this long for its replicas to answer

__all__ = ["BalancerRestarted", "OmniRequestLoadBalancer", "VALID_ROLLOUT_SERVER_ROUTING_POLICIES"]


class BalancerRestarted(RuntimeError):
    """An acquire named an earlier incarnation of the balancer: the client restores its leases, then retries."""


@dataclass
class _Lease:
    """What one acquire placed, kept until its release: who holds it and how many requests on each replica."""

    owner: str | None
    servers: dict[str, int]


class OmniRequestLoadBalancer:
    """Sticky, load-aware request router shared by all agent-loop workers.

    Policies (``routing.policy``):

    - ``least_inflight`` (default): verl's behaviour. Sticky on ``request_id``; a new id goes to a
      uniformly random server among the least loaded.
    - ``prompt_uid_affinity``: sticky on ``routing_key`` (each copy's ``request_id`` when the key is None
      or empty), so all copies of a prompt land on one replica. A new key goes to a random least-loaded
      replica. Soft affinity (``max_imbalance`` set): a group whose pinned replica is more than
      ``max_imbalance`` requests **and** more than ``max_imbalance_ratio`` times above the least-loaded
      replica (loads before the group is added) is diverted whole to a random least-loaded replica, and
      the key is re-pinned there. A group is never split: its prompt is encoded once either way
      (``benchmarks/routing_sim.py`` measured spreading a diverted group's copies: lower co-location and
      prompt-cache hits, and no shorter makespan).
    - ``prompt_hash_sharding``: ``sorted(server_ids)[stable_int(key) % R]``; the same key maps to
      the same replica in every process and run for a fixed pool.
    - ``round_robin``: rotates over the sorted server ids, ignoring load and keys.

    :meth:`acquire_group` places a whole group in one call and returns the placement (replica ->
    copies); :meth:`release_group` releases it in one call. The placement is exactly what acquiring the
    copies one by one, with nothing in between, would give. verl's per-request ``acquire_server`` /
    ``release_server`` stay, with verl's signatures, for verl's own client.

    ``routing.speed_aware``: "least loaded" (a new key, a new request id, a diverted group) means the
    replica where new work would finish first, from each replica's seconds per request as measured between
    this balancer's acquires and releases (``ReplicaSpeeds``), and the soft-affinity gate compares that
    expected work in requests at the mean speed. Until every replica has a measurement, plain counts.

    Restarts: Ray re-runs ``__init__`` from the creation arguments when this actor's process dies, so a new
    life knows no counts and no pins while requests placed by the previous one still run. Each life has an
    ``incarnation``; the overlay's client names every acquire by a lease and keeps it until its release, and
    re-sends the leases it still has in flight (:meth:`restore_leases`) once it learns of a new incarnation (a
    refused acquire, or the answer to a release). A release of a lease this life does not know is ignored.

    Every count-based pick is O(1) in the number of replicas (``LoadBuckets``), a speed-aware one O(log R);
    the sorted id list is kept up to date on add/remove instead of being rebuilt per request.
    """

    def __init__(
        self,
        servers: dict[str, Any],
        max_cache_size: int = DEFAULT_ROUTING_CACHE_SIZE,
        full_determinism: bool = False,
        routing: RolloutServerRoutingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ):
        """``servers``, ``max_cache_size`` and ``full_determinism`` as verl's balancer takes them; ``routing``
        (validated by its constructor) picks the policy. Ties are broken by a seeded generator under
        ``full_determinism`` (or ``seed``), so a replayed request stream is placed the same way (speed-aware
        picks also depend on measured timing). ``clock`` (seconds) times the replicas for
        ``routing.speed_aware``; a simulation passes its own."""
        routing = routing or RolloutServerRoutingConfig()
        if isinstance(max_cache_size, bool) or not isinstance(max_cache_size, int) or max_cache_size <= 0:
            raise ValueError(f"max_cache_size={max_cache_size!r} must be a positive integer")
        self.routing = routing
        # verl's full_determinism routes by a hash of request_id; here that hash is stable across runs.
        self._full_determinism = full_determinism
        self._servers: dict[str, Any] = {}
        self._sorted_ids: list[str] = []
        if seed is None and full_determinism:
            seed = 0
        self._load = LoadBuckets(rng=random.Random(seed) if seed is not None else None)
        self._speeds = (
            ReplicaSpeeds(self._load.count, clock, rng=random.Random(seed + 1) if seed is not None else None)
            if routing.speed_aware
            else None
        )
        self._sticky = LRUMap(maxsize=max_cache_size)
        self._served: dict[str, int] = {}
        self._held: dict[str, dict[str, int]] = {}  # owner -> server -> requests it holds in flight
        self._leases: dict[str, _Lease] = {}  # lease id -> what that acquire placed (restorable after a restart)
        self._removed: set[str] = set()  # replicas removed in this life: a restored lease does not bring them back
        self._restored = 0
        # Identifies this life of the actor: Ray re-runs __init__ on a restart, so a restart gets a new one.
        self.incarnation = uuid.uuid4().hex
        self._rr_next = 0
        self._diversions = 0
        self._split_groups = 0
        self._acquires = 0
        self._releases = 0
        self._acquire_calls = 0
        self._release_calls = 0
        self._keyed_pick = {  # policies that place a keyed group whole on one replica
            "prompt_uid_affinity": self._pin_affinity,
            "prompt_hash_sharding": self._pin_hash,
        }.get(routing.policy)
        self._pick = {
            "least_inflight": self._pick_least_inflight,
            "prompt_uid_affinity": self._pick_affinity,
            "prompt_hash_sharding": self._pick_hash,
            "round_robin": self._pick_round_robin,
        }[routing.policy]
        self.add_servers(servers)
        self._dropped_at_restart = self._forget_dead_servers_after_restart()

    # ------------------------------------------------------------------ routing
    def acquire_group(
        self,
        request_ids: list[str],
        routing_key: str | None = None,
        owner: str | None = None,
        lease: str | None = None,
        incarnation: str | None = None,
    ) -> list[tuple[str, Any, list[int]]]:
        """Place the copies of one group and count them in flight: ``[(server_id, handle, copy indices)]``.

        ``request_ids`` are the copies' ids (for policies sticky on request ids and as keys when
        ``routing_key`` is None). Affinity (strict or soft) and hash sharding return one replica for a keyed
        group; least_inflight and round_robin may return several. Release with :meth:`release_group`.
        ``owner`` (an agent-loop worker's name) records what it holds, so :meth:`release_owner` can free it
        if that worker dies before releasing. ``lease`` (an id the client chooses, unique per acquire) names
        the placement so it survives a restart of this actor (:meth:`restore_leases`); ``incarnation`` is the
        life of this actor the client has restored its leases to: an earlier one raises
        :class:`BalancerRestarted` before anything is placed.
        """
        if incarnation is not None and incarnation != self.incarnation:
            raise BalancerRestarted(
                f"the load balancer was restarted (incarnation {self.incarnation}, the client knew {incarnation}): "
                "restore_leases() first"
            )
        if not self._servers:
            raise RuntimeError("No available servers in load balancer")
        if not request_ids:
            raise ValueError("acquire_group() needs at least one request id")
        self._acquire_calls += 1
        placement = self._place(request_ids, routing_key or None)
        if len(placement) > 1:
            self._split_groups += 1
        counts = {sid: len(copies) for sid, copies in placement.items()}
        self._hold(owner, counts)
        if lease is not None:
            self._leases[lease] = _Lease(owner, counts)
        return [(sid, self._servers[sid], copies) for sid, copies in placement.items()]

    def release_group(
        self, placement: list[tuple[str, int]], owner: str | None = None, lease: str | None = None
    ) -> str:
        """Release what :meth:`acquire_group` placed: ``[(server_id, count)]``; removed servers are ignored.

        With a ``lease``, what this actor recorded for it is released; a lease it does not know was placed by an
        earlier incarnation and never restored, so it is not counted here and nothing is released (a late
        release must not take load off requests placed since). Returns this actor's incarnation, so a client
        learns of a restart from its releases too.
        """
        for _, count in placement:
            if type(count) is not int or count < 1:  # bool is not int
                raise _bad_count(count)
        self._release_calls += 1
        if lease is not None:
            record = self._leases.pop(lease, None)
            if record is None:
                return self.incarnation
            owner, placement = record.owner, list(record.servers.items())
        held = self._held.get(owner) if owner is not None else None
        for server_id, count in placement:
            if held is not None and server_id in held:
                held[server_id] -= count
                if held[server_id] <= 0:
                    del held[server_id]
            self._releases += self._drop(server_id, count)
        return self.incarnation

    def restore_leases(
        self, leases: list[tuple[str, str | None, list[tuple[str, Any, int]]]], owner: str | None = None
    ) -> str:
        """Count again what a client still has in flight after this actor was restarted; returns the incarnation.

        Ray restarts a dead balancer from its creation arguments: no counts, no pins, while requests it placed
        are still running. Each client sends its outstanding leases ``(lease id, routing key, [(server_id,
        handle, count)])``; they are counted in flight again (a lease already known is skipped, so restoring twice
        counts once), and under ``prompt_uid_affinity`` a key still in flight on one replica is pinned there
        again, so the group's later copies join it. A replica missing from the creation arguments (added later)
        comes back with its handle, unless it was removed in this life. ``leases=[]`` only asks the incarnation.
        """
        pin = self.routing.policy == "prompt_uid_affinity"
        for lease, routing_key, parts in leases:
            if lease in self._leases:
                continue
            counts: dict[str, int] = {}
            for server_id, handle, count in parts:
                if server_id not in self._servers:
                    if server_id in self._removed or handle is None:
                        continue
                    self.add_servers({server_id: handle})
                self._count_in(server_id, count, served=False)
                counts[server_id] = counts.get(server_id, 0) + count
            if not counts:
                continue
            self._leases[lease] = _Lease(owner, counts)
            self._hold(owner, counts)
            self._restored += sum(counts.values())
            if pin and routing_key and len(counts) == 1 and self._sticky_lookup(routing_key) is None:
                self._sticky.put(routing_key, next(iter(counts)))
        return self.incarnation

    def release_owner(self, owner: str) -> int:
        """Release everything ``owner`` still holds (its process died mid-request); returns the requests freed.

        A restarted agent-loop worker calls this first, so its lost releases do not leave phantom load
        that would steer every later pick away from those replicas.
        """
        freed = 0
        for server_id, count in self._held.pop(owner, {}).items():
            freed += self._drop(server_id, count, completed=False)
        self._releases += freed
        for lease in [lease for lease, record in self._leases.items() if record.owner == owner]:
            del self._leases[lease]
        return freed

    def _hold(self, owner: str | None, counts: dict[str, int]) -> None:
        if owner is None:
            return
        held = self._held.setdefault(owner, {})
        for server_id, count in counts.items():
            held[server_id] = held.get(server_id, 0) + count

    def acquire_server(self, request_id: str, routing_key: str | None = None) -> tuple[str, Any]:
        """verl's per-request acquire: pick a server, count it in flight, return ``(server_id, handle)``."""
        if not self._servers:
            raise RuntimeError("No available servers in load balancer")
        self._acquire_calls += 1
        (server_id,) = self._place([request_id], routing_key or None)
        return server_id, self._servers[server_id]

    def release_server(self, server_id: str, request_id: str | None = None) -> None:
        """verl's per-request release; an unknown or idle server is ignored (as in verl)."""
        self._release_calls += 1
        self._releases += self._drop(server_id, 1)

    def require_acquire_fields(self) -> list[str]:
        """verl's client sends these ``generate()`` kwargs to :meth:`acquire_server`."""
        return ["routing_key"]

    def require_release_fields(self) -> list[str]:
        return []

    def _place(self, request_ids: list[str], key: str | None) -> dict[str, list[int]]:
        count = len(request_ids)
        self._acquires += count
        if key is not None and self._keyed_pick is not None:
            server_id = self._keyed_pick(key)
            self._count_in(server_id, count)
            return {server_id: list(range(count))}
        placement: dict[str, list[int]] = {}
        for i, request_id in enumerate(request_ids):  # each copy by its own request id (and the load so far)
            server_id = self._pick(request_id, key)
            self._count_in(server_id, 1)
            placement.setdefault(server_id, []).append(i)
        return placement

    def _count_in(self, server_id: str, count: int, served: bool = True) -> None:
        before = self._load.count(server_id)
        self._load.increment(server_id, count)
        if self._speeds is not None:
            self._speeds.changed(server_id, before, before + count)
        if served:  # a restored lease was served (and counted) by an earlier incarnation
            self._served[server_id] = self._served.get(server_id, 0) + count

    def _drop(self, server_id: str, count: int, completed: bool = True) -> int:
        """Count ``count`` requests out of ``server_id`` (``completed``: they came back, so they time it)."""
        before = self._load.count(server_id)
        dropped = self._load.decrement(server_id, count)
        if dropped and self._speeds is not None:
            self._speeds.changed(server_id, before, before - dropped, completed=completed)
        return dropped

    def _least_loaded(self) -> str:
        """Where new work goes: the fewest in flight, or with ``speed_aware`` the earliest expected finish."""
        if self._speeds is not None and self._speeds.active:
            return self._speeds.pick()
        return self._load.pick_least_loaded()

    def _sticky_lookup(self, key: str) -> str | None:
        server_id = self._sticky.get(key)
        if server_id is None:
            return None
        if server_id in self._servers:
            return server_id
        self._sticky.pop(key)  # pinned to a removed server: re-route
        return None

    def _pin_affinity(self, key: str) -> str:
        """The replica a keyed group goes to whole: its pin, unless new or past the soft-affinity gate."""
        server_id = self._sticky_lookup(key)
        if server_id is not None:
            routing = self.routing
            if routing.max_imbalance is None:
                return server_id
            speeds = self._speeds
            if speeds is not None and speeds.active:  # expected work, in requests at the mean speed
                best = speeds.pick()
                load, least = speeds.load(server_id), speeds.load(best)
            else:
                best, load, least = None, self._load.count(server_id), self._load.min_count
            if load - least <= routing.max_imbalance or load <= routing.max_imbalance_ratio * least:
                return server_id
            self._diversions += 1
            server_id = best or self._load.pick_least_loaded()
        else:
            server_id = self._least_loaded()
        self._sticky.put(key, server_id)
        return server_id

    def _pin_hash(self, key: str) -> str:
        return self._sorted_ids[stable_int(key) % len(self._sorted_ids)]

    def _pick_least_inflight(self, request_id: str, routing_key: str | None) -> str:
        server_id = self._sticky_lookup(request_id)
        if server_id is None:
            if self._full_determinism:
                server_id = self._sorted_ids[stable_int(request_id) % len(self._sorted_ids)]
            else:
                server_id = self._least_loaded()
            self._sticky.put(request_id, server_id)
        return server_id

    def _pick_affinity(self, request_id: str, routing_key: str | None) -> str:
        """A copy without a routing key: its request id is its key."""
        return self._pin_affinity(request_id)

    def _pick_hash(self, request_id: str, routing_key: str | None) -> str:
        return self._pin_hash(request_id)

    def _pick_round_robin(self, request_id: str, routing_key: str | None) -> str:
        server_id = self._sorted_ids[self._rr_next % len(self._sorted_ids)]
        self._rr_next = (self._rr_next + 1) % len(self._sorted_ids)
        return server_id

    def _forget_dead_servers_after_restart(self) -> list[str]:
        """Ray restarts a dead balancer actor from its creation arguments, which still list replicas that died
        since; each would cost the first group placed on it a resend. So a restarted balancer asks every replica
        actor for Ray's built-in ``__ray_ready__`` and removes those Ray reports dead (a busy replica that does
        not answer within ``RESTART_PROBE_TIMEOUT_S`` is kept)."""
        if "ray" not in sys.modules:  # in-process (simulator, tests): Ray never loaded, nothing to recover
            return []
        import ray

        from verl_omni.utils.ray_actor import restarted_actor

        if not restarted_actor():  # not an actor, or its first life
            return []
        probes = {sid: h.__ray_ready__.remote() for sid, h in self._servers.items() if hasattr(h, "__ray_ready__")}
        ready, _ = ray.wait(list(probes.values()), num_returns=len(probes), timeout=RESTART_PROBE_TIMEOUT_S)
        answered = set(ready)
        dead = []
        for server_id, ref in probes.items():
            if ref in answered:
                try:
                    ray.get(ref)
                except ray.exceptions.ActorDiedError:
                    dead.append(server_id)
        if dead:
            logger.warning("[OmniRequestLoadBalancer] restarted: %d dead replicas removed: %s", len(dead), dead)
            self.remove_servers(dead)
        return dead

    # ------------------------------------------------------------- pool changes
    def add_servers(self, servers: dict[str, Any]) -> None:
        """Add (or re-register) servers; a re-registered server keeps its in-flight count."""
        for server_id, handle in servers.items():
            if server_id not in self._servers:
                bisect.insort(self._sorted_ids, server_id)
                self._load.add(server_id)
                if self._speeds is not None:
                    self._speeds.add(server_id)
            self._servers[server_id] = handle
            self._removed.discard(server_id)
        logger.info("[OmniRequestLoadBalancer] added %d servers", len(servers))

    def remove_servers(self, server_ids: list[str]) -> None:
        """Remove servers; sticky entries that point to them are re-routed on next use."""
        for server_id in server_ids:
            if server_id not in self._servers:  # unknown or already removed (a handle itself may be None)
                continue
            self._removed.add(server_id)
            del self._servers[server_id]
            self._sorted_ids.pop(bisect.bisect_left(self._sorted_ids, server_id))
            self._load.remove(server_id)
            if self._speeds is not None:
                self._speeds.remove(server_id)
        logger.info("[OmniRequestLoadBalancer] removed %d servers", len(server_ids))

    # ---------------------------------------------------------------- inspection
    def get_inflight_count(self, server_id: str) -> int:
        return self._load.count(server_id)

    def get_all_servers(self) -> list[str]:
        return list(self._servers)

    def get_total_inflight(self) -> int:
        return self._load.total

    def clear_sticky_cache(self) -> dict:
        """Forget all pins (verl calls this on phase switches); in-flight counts are kept."""
        cleared = len(self._sticky)
        self._sticky.clear()
        return {"cleared_entries": cleared, "server_loads": self._load.as_dict()}

    def get_status(self) -> dict:
        """verl's status keys plus the policy, per-replica served counts, pins and diversions.

        ``acquires``/``releases`` count requests; ``acquire_calls``/``release_calls`` count the calls
        that carried them (fewer when groups are acquired at once).
        """
        return {
            "servers": self._load.as_dict(),
            "total_inflight": self._load.total,
            "active_servers": len(self._servers),
            "registered_handles": list(self._servers),
            "policy": self.routing.policy,
            "max_imbalance": self.routing.max_imbalance,
            "max_imbalance_ratio": self.routing.max_imbalance_ratio,
            "served": {sid: self._served.get(sid, 0) for sid in self._servers},
            "pinned_keys": len(self._sticky),
            "diversions": self._diversions,
            "split_groups": self._split_groups,
            "speed_aware": self._speeds is not None,
            "dropped_at_restart": list(self._dropped_at_restart),
            "seconds_per_request": self._speeds.as_dict() if self._speeds is not None else {},
            "held": {owner: sum(held.values()) for owner, held in self._held.items() if held},
            "incarnation": self.incarnation,
            "leases": len(self._leases),
            "restored": self._restored,
            "acquires": self._acquires,
            "releases": self._releases,
            "acquire_calls": self._acquire_calls,
            "release_calls": self._release_calls,
        }


def _bad_count(count: object) -> ValueError:
    return ValueError(f"count={count!r} must be a positive integer (the number of requests released on that server)")
