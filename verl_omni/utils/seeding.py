"""Stable hashes, the same in every process and run (no ``hash()``): per-row seeds and routing-key shards."""

from __future__ import annotations

import hashlib


def stable_int(*parts: object, bits: int = 63) -> int:
    """A hash of ``parts`` that is the same in every process and Python version (unlike ``hash()``)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << bits) - 1)


def row_seed(base_seed: int, global_step: int, global_row_index: int) -> int:
    """Sampling seed of one rollout row, in ``[0, 2**63)``.

    Depends only on (base seed, step, the row's index in the step's batch), never on the worker,
    replica or batch position that served it, so routing cannot change what is generated and a
    resumed run redraws the same noise.
    """
    return stable_int("row_seed", int(base_seed), int(global_step), int(global_row_index))
