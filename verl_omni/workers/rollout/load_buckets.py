"""In-flight counts bucketed by value: O(1) least-loaded pick with unbiased tie-breaking."""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator


class LoadBuckets:
    """Tracks an in-flight count per server.

    Servers are grouped in lists by count (``_buckets[c]``), each server remembers its index in
    its list (``_pos``), and the minimum count is maintained incrementally. Moving a server
    between buckets is a swap-remove plus an append, and a uniform pick among the least loaded
    is one index into the minimum bucket: O(1) whatever the pool size. Only removing the last
    server at the minimum, or moving it up by ``k`` (a group acquired at once), scans upward over
    counts (bounded by the largest count or by ``k``, never by R).

    The hot methods are written out flat on purpose: this runs once per rollout request inside
    the single balancer actor, where Python call overhead dominates.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._count: dict[Hashable, int] = {}
        self._pos: dict[Hashable, int] = {}
        self._buckets: dict[int, list[Hashable]] = {}
        self._min = 0
        self._total = 0
        self._random = (rng or random.Random()).random

    def __contains__(self, server_id: Hashable) -> bool:
        return server_id in self._count

    def __len__(self) -> int:
        return len(self._count)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._count)

    @property
    def total(self) -> int:
        return self._total

    @property
    def min_count(self) -> int:
        """Smallest in-flight count over the pool (0 for an empty pool)."""
        return self._min if self._count else 0

    def count(self, server_id: Hashable) -> int:
        return self._count.get(server_id, 0)

    def as_dict(self) -> dict[Hashable, int]:
        return dict(self._count)

    def add(self, server_id: Hashable) -> None:
        """Add an idle server (no-op if present)."""
        if server_id in self._count:
            return
        self._count[server_id] = 0
        self._push(server_id, 0)
        self._min = 0

    def remove(self, server_id: Hashable) -> None:
        count = self._count.pop(server_id, None)
        if count is None:
            return
        self._detach(server_id, count)
        self._total -= count
        if self._count and count == self._min:
            while self._min not in self._buckets:
                self._min += 1

    def increment(self, server_id: Hashable, k: int = 1) -> None:
        """Raise the count by ``k`` (a group of ``k`` requests acquired in one call)."""
        count = self._count[server_id]
        new = count + k
        self._count[server_id] = new
        self._total += k
        buckets, pos = self._buckets, self._pos
        # append to bucket `new` first, so a minimum search below always ends there
        items = buckets.get(new)
        if items is None:
            buckets[new] = [server_id]
            new_pos = 0
        else:
            new_pos = len(items)
            items.append(server_id)
        # swap-remove from bucket `count`
        items = buckets[count]
        last = items.pop()
        if last != server_id:
            idx = pos[server_id]
            items[idx] = last
            pos[last] = idx
        elif not items:
            del buckets[count]
            if count == self._min:
                # the next minimum is at most `new` (where this server now is): at most k lookups
                count += 1
                while count not in buckets:
                    count += 1
                self._min = count
        pos[server_id] = new_pos

    def decrement(self, server_id: Hashable, k: int = 1) -> int:
        """Lower the count by ``k`` (at most to zero); returns by how much (0 for an unknown or idle server)."""
        count = self._count.get(server_id)
        if not count:
            return 0
        if k > count:
            k = count
        new = count - k
        self._count[server_id] = new
        self._total -= k
        buckets, pos = self._buckets, self._pos
        items = buckets[count]
        last = items.pop()
        if last != server_id:
            idx = pos[server_id]
            items[idx] = last
            pos[last] = idx
        elif not items:
            del buckets[count]
        items = buckets.get(new)
        if items is None:
            buckets[new] = [server_id]
            pos[server_id] = 0
        else:
            pos[server_id] = len(items)
            items.append(server_id)
        if new < self._min:
            self._min = new
        return k

    def pick_least_loaded(self) -> Hashable:
        """A uniformly random server among those with the fewest in-flight requests."""
        if not self._count:
            raise RuntimeError("No available servers in load balancer")
        items = self._buckets[self._min]
        n = len(items)
        return items[0] if n == 1 else items[int(self._random() * n)]

    def _push(self, server_id: Hashable, count: int) -> None:
        items = self._buckets.setdefault(count, [])
        self._pos[server_id] = len(items)
        items.append(server_id)

    def _detach(self, server_id: Hashable, count: int) -> None:
        items = self._buckets[count]
        last = items.pop()
        if last != server_id:
            idx = self._pos[server_id]
            items[idx] = last
            self._pos[last] = idx
        elif not items:
            del self._buckets[count]
        del self._pos[server_id]
