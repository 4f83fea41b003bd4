"""A small LRU map on ``OrderedDict`` (C-implemented): the balancer's sticky pins and the replicas'
prompt-embedding cache.

verl uses ``cachetools.LRUCache``; its pure-Python get/set costs about 1.4 us per request here,
more than the rest of a routing decision.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any


class LRUMap:
    """Key -> server id with least-recently-used eviction beyond ``maxsize`` entries."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        """The value for ``key`` (marking it recently used), or None."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> bool:
        """Store ``value``; returns True when the least recently used entry was evicted to make room."""
        data = self._data
        data[key] = value
        data.move_to_end(key)
        if len(data) > self.maxsize:
            data.popitem(last=False)
            return True
        return False

    def pop(self, key: Hashable) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data
