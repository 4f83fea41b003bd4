"""LRU cache of text encodings: a replica encodes each distinct prompt once until it is evicted.

Entries are keyed by the text alone (a prompt or a CFG negative prompt), so the negative prompt a
whole batch shares is one entry. Text encoders are never updated by ``update_weights`` (only the
transformer is), so entries stay valid across weight updates.
"""

from __future__ import annotations

from typing import Any

from verl_omni.utils.lru import LRUMap


class PromptEmbeddingCache:
    """Bounded LRU from text to its ``(prompt_embeds (L, D), pooled_prompt_embeds (P,))``.

    ``maxsize=0`` disables caching: every lookup misses and nothing is stored. Not thread-safe: the
    server uses it from its single engine thread only.
    """

    def __init__(self, maxsize: int):
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 0:
            raise ValueError(f"prompt_cache_size={maxsize!r} must be an integer >= 0")
        self.maxsize = maxsize
        self._entries = LRUMap(maxsize) if maxsize > 0 else None
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, text: str) -> Any | None:
        """The cached encoding of ``text`` (marked most recently used), or None; counts a hit or a miss."""
        entry = self._entries.get(text) if self._entries is not None else None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def record_hit(self) -> None:
        """Count a hit served outside :meth:`get` (a text already encoded for an earlier request of a batch)."""
        self.hits += 1

    def put(self, text: str, value: Any) -> None:
        """Store ``value`` for ``text``, evicting the least recently used entry beyond ``maxsize``."""
        if self._entries is not None and self._entries.put(text, value):
            self.evictions += 1

    def clear(self) -> None:
        if self._entries is not None:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries) if self._entries is not None else 0

    def __contains__(self, text: object) -> bool:
        return self._entries is not None and text in self._entries

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self),
            "capacity": self.maxsize,
            "evictions": self.evictions,
        }
