"""``RolloutReplicaPool``: the rollout replicas that receive the policy's weights, each slot refilled when its
server dies.

A replica's server actor can die at any time (a SIGKILL, the OOM killer, a lost node). The client's failover
resends the requests it held; the pool notices the death at the next weight push and starts a replacement in
the same slot (same address) on the capacity Ray has: loaded from the model path, given the weights and version
of that push before it serves, then registered with the load balancer. Without the capacity the slot stays
vacant (training goes on with the others) and is tried again at every push. A replacement that dies at start-up
``max_start_attempts`` times in a row ends the run with its error rather than looping.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray

from verl_omni.utils.ray_actor import ACTOR_GONE

logger = logging.getLogger(__name__)


class RolloutReplicaPool:
    """Every replica slot of the run; a slot is live (its server serves) or vacant (its server died).

    Args:
        replicas: the launched replicas (``DiffusersRolloutReplica`` or a subclass: ``start_server``,
            ``serve_with``, ``server_resources``); one whose class cannot start a server again is only dropped.
        load_balancer: the balancer actor the clients use; each push re-registers the live servers (a
            replacement, or every server after the balancer itself restarted from its creation arguments).
        max_start_attempts: starts of a replacement in one push before its error ends the run.
        start_timeout_s: how long a replacement may take to load its model.
        capacity_wait_s: how long to wait for Ray to report a dead server's resources free again.
    """

    def __init__(
        self,
        replicas: list[Any],
        load_balancer: Any = None,
        max_start_attempts: int = 3,
        start_timeout_s: float = 600.0,
        capacity_wait_s: float = 2.0,
    ):
        self.slots = list(replicas)
        self.load_balancer = load_balancer
        self.max_start_attempts = max_start_attempts
        self.start_timeout_s = start_timeout_s
        self.capacity_wait_s = capacity_wait_s
        self.vacant: list[Any] = []
        self.lost = 0  # servers that died
        self.replaced = 0  # replacements that started and serve

    @property
    def live(self) -> list[Any]:
        """The replicas whose servers serve, in slot order."""
        return [r for r in self.slots if all(r is not v for v in self.vacant)]

    def metrics(self) -> dict[str, float]:
        return {
            "rollout/replicas_live": float(len(self.live)),
            "rollout/replicas_lost": float(self.lost),
            "rollout/replicas_replaced": float(self.replaced),
        }

    def push(self, weights: dict[str, Any], version: int) -> None:
        """Load ``weights`` (``update_weights`` keyword -> value or ``ObjectRef``) tagged ``version`` into every
        live server, then refill the vacant slots with the same weights; raises when no replica is left."""
        pending = [
            (replica, server.update_weights.remote(**weights, version=version))
            for replica in self.live
            for server in replica.servers
        ]
        for replica, future in pending:
            try:
                ray.get(future)
            except ACTOR_GONE as err:  # the client's failover already routes around it
                logger.warning("rollout replica %s is gone (%s)", _address(replica), err)
                if all(replica is not v for v in self.vacant):
                    self.vacant.append(replica)
                    self.lost += 1
        for replica in list(self.vacant):
            if self._refill(replica, weights, version):
                self.vacant.remove(replica)
        if not self.live:
            raise RuntimeError("every rollout replica is gone: nothing left to sample with")
        if self.load_balancer is not None:
            if self.vacant:
                self.load_balancer.remove_servers.remote([_address(r) for r in self.vacant])
            servers = {_address(r): r.server_handle for r in self.live}
            ray.get(self.load_balancer.add_servers.remote(servers))  # ordered after the removal (one caller)

    def _refill(self, replica: Any, weights: dict[str, Any], version: int) -> bool:
        """Start a replacement server for ``replica``'s slot; False when its class cannot or Ray has no room."""
        if not hasattr(replica, "start_server"):
            return False
        if not self._capacity_for(replica.server_resources()):
            logger.warning("rollout replica %s: no room in the Ray cluster for a replacement yet", _address(replica))
            return False
        error: Exception | None = None
        for attempt in range(1, self.max_start_attempts + 1):
            handle = replica.start_server()
            try:
                ray.get(handle.ready.remote(), timeout=self.start_timeout_s)
                ray.get(handle.update_weights.remote(**weights, version=version), timeout=self.start_timeout_s)
            except ray.exceptions.RayError as err:  # died in start-up, failed to load, or too slow
                ray.kill(handle)
                error = err
                logger.warning("replacement %d for rollout replica %s failed: %s", attempt, _address(replica), err)
                continue
            replica.serve_with(handle)
            self.replaced += 1
            logger.warning("rollout replica %s replaced (model version %s)", _address(replica), version)
            return True
        raise RuntimeError(
            f"rollout replica {_address(replica)}: its replacement failed to start {self.max_start_attempts} times "
            f"in a row; last error: {error}"
        ) from error

    def _capacity_for(self, resources: dict[str, float]) -> bool:
        """Whether Ray's free resources hold ``resources`` (a dead actor's come back within moments)."""
        deadline = time.monotonic() + self.capacity_wait_s
        while True:
            free = ray.available_resources()
            if all(free.get(name, 0.0) >= amount for name, amount in resources.items() if amount > 0):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def _address(replica: Any) -> str:
    return str(getattr(replica, "server_address", replica))
