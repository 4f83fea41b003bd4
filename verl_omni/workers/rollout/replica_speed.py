"""Each rollout replica's measured seconds per request, and the replica that would finish new work first.

Counting requests in flight balances replicas of equal speed. When one replica is slower (an older GPU, a
busy node, thermal throttling) it gets as many groups as the others and the whole step waits for it: in
``benchmarks/routing_sim.py`` one half-speed replica stretches the makespan 1.6-1.9x under every count-based
policy.
The balancer sees every acquire and release, so it can measure each replica's throughput itself, with no call
to the replicas: ``ReplicaSpeeds`` keeps that measurement and picks by expected finish time instead of count.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Hashable

# Recent work counts most: past this many released requests, a replica's sums are scaled down (an estimate
# over roughly the last WINDOW requests, so a replica that slows down mid-run is noticed within a few steps).
WINDOW = 256
MIN_REQUESTS = 1  # a replica's cost is known once it has released this many requests


class ReplicaSpeeds:
    """Busy time and released requests per replica; cost = busy seconds per request.

    A replica is busy while the balancer counts requests in flight on it; busy time is accounted at every
    change of that count, so a replica's cost is its throughput at the load it actually ran. Copies a dead
    agent-loop worker never released (``completed=False``) end the busy span without counting as done.

    Costs are used only once every replica has one (:attr:`active`; before that the caller balances plain
    counts): comparing a measured replica with an unknown one would be a guess. A replica added later starts
    at the mean cost. :meth:`pick` is O(log R) amortised: a heap of ``(in_flight + 1) x cost`` with stale
    entries skipped (each entry carries the replica's version) and a rebuild when stale entries pile up.
    """

    def __init__(
        self,
        count: Callable[[Hashable], int],
        clock: Callable[[], float],
        rng: random.Random | None = None,
        window: int = WINDOW,
    ) -> None:
        """``count(server_id)`` is the balancer's in-flight count; ``clock`` returns seconds (monotonic)."""
        self._count = count
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._window = window
        self._busy: dict[Hashable, float] = {}  # busy seconds (scaled with _done)
        self._done: dict[Hashable, float] = {}  # released requests
        self._since: dict[Hashable, float] = {}  # last accounting time of a busy replica
        self._cost: dict[Hashable, float] = {}  # seconds per request, for measured replicas (all, once active)
        self._cost_sum = 0.0
        self._version: dict[Hashable, int] = {}
        self._heap: list[tuple[float, float, int, Hashable]] = []
        self.active = False

    # ------------------------------------------------------------------ pool
    def add(self, server_id: Hashable) -> None:
        if server_id in self._version:
            return
        self._version[server_id] = 0
        self._busy[server_id] = self._done[server_id] = 0.0
        if self.active:  # keep every replica costed: a newcomer starts at the mean
            self._set_cost(server_id, self.mean_cost)
            self._push(server_id)
        else:
            self._maybe_activate()

    def remove(self, server_id: Hashable) -> None:
        if self._version.pop(server_id, None) is None:
            return
        self._busy.pop(server_id)
        self._done.pop(server_id)
        self._since.pop(server_id, None)
        cost = self._cost.pop(server_id, None)
        if cost is not None:
            self._cost_sum -= cost
        if not self._version:
            self.active, self._heap = False, []
        elif not self.active:
            self._maybe_activate()

    # --------------------------------------------------------------- updates
    def changed(self, server_id: Hashable, before: int, after: int, completed: bool = True) -> None:
        """Account for the in-flight count of ``server_id`` going from ``before`` to ``after``."""
        if server_id not in self._version:
            return
        now = self._clock()
        since = self._since.pop(server_id, None)
        if since is not None and completed:
            self._busy[server_id] += now - since
        if after < before and completed:
            self._done[server_id] += before - after
            done = self._done[server_id]
            if done > self._window:  # keep about the last `window` requests
                self._busy[server_id] *= self._window / done
                self._done[server_id] = float(self._window)
            if self._done[server_id] >= MIN_REQUESTS and self._busy[server_id] > 0:
                self._set_cost(server_id, self._busy[server_id] / self._done[server_id])
        if after > 0:
            self._since[server_id] = now
        if self.active:
            self._push(server_id)
        elif after < before:
            self._maybe_activate()

    # ----------------------------------------------------------------- reads
    @property
    def mean_cost(self) -> float:
        return self._cost_sum / len(self._cost) if self._cost else 0.0

    def cost(self, server_id: Hashable) -> float | None:
        """Measured seconds per request (None until measured)."""
        return self._cost.get(server_id)

    def load(self, server_id: Hashable) -> float:
        """In-flight work in requests at the mean replica speed: ``in_flight x cost / mean cost``."""
        return self._count(server_id) * self._cost[server_id] / self.mean_cost

    def pick(self) -> Hashable:
        """The replica where one more request would finish first (random among ties). Only when :attr:`active`."""
        heap, version = self._heap, self._version
        while heap:
            _, _, v, server_id = heap[0]
            if version.get(server_id) == v:
                return server_id
            heapq.heappop(heap)
        raise RuntimeError("No available servers in load balancer")

    def as_dict(self) -> dict[Hashable, float | None]:
        return {sid: self._cost.get(sid) for sid in self._version}

    # -------------------------------------------------------------- internals
    def _set_cost(self, server_id: Hashable, cost: float) -> None:
        self._cost_sum += cost - self._cost.get(server_id, 0.0)
        self._cost[server_id] = cost

    def _maybe_activate(self) -> None:
        if self._version and len(self._cost) == len(self._version):
            self.active = True
            self._rebuild()

    def _push(self, server_id: Hashable) -> None:
        v = self._version[server_id] + 1
        self._version[server_id] = v
        key = (self._count(server_id) + 1) * self._cost[server_id]
        heapq.heappush(self._heap, (key, self._random(), v, server_id))
        if len(self._heap) > 4 * len(self._version) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        version, count, cost, rand = self._version, self._count, self._cost, self._random
        self._heap = [((count(s) + 1) * cost[s], rand(), v, s) for s, v in version.items()]
        heapq.heapify(self._heap)
