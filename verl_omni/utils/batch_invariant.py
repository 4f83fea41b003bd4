"""Batch-invariant execution: every network call on exactly ``chunk_size`` rows.

Matmul and convolution kernels pick their blocking and reduction order from the problem shape: on an
AVX-512 CPU (torch 2.13, MKL) a row of ``F.linear`` computed among 1-3 rows differs in the last bits from
the same row among 5 or more, while calls of one shape agree bit for bit whatever the rows' order. Running
every call at one fixed shape (padding the last chunk) makes a sample's numbers a function of the sample
alone, not of its batch-mates. The rollout engine and the training actor both go through
:func:`map_chunks`, so with unchanged weights the trainer recomputes a stored log-prob bit for bit (CPU,
``MKL_CBWR`` strict, oneDNN off: see ``docs/advanced_features/determinism.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

# MKL's strict conditional-numerical-reproducibility mode pins one code path (AVX2, on every x86-64 CPU
# of the last decade) and makes GEMM results independent of the thread count. It must be in the process
# environment before MKL loads, so it is set where Ray starts the replica and actor processes.
BATCH_INVARIANT_MKL_CBWR = "AVX2,STRICT"


def cpu_process_env(threads: int | None, batch_invariant: bool) -> dict[str, str]:
    """Environment for a CPU compute process (rollout replica or training actor): thread counts and MKL's mode.

    ``threads`` None or < 1 leaves the thread count to torch. A ``MKL_CBWR`` already set in the driver's
    environment wins (e.g. to compare modes).
    """
    env: dict[str, str] = {}
    if threads is not None and threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if batch_invariant:
        env["MKL_CBWR"] = os.environ.get("MKL_CBWR", BATCH_INVARIANT_MKL_CBWR)
    return env


def mkl_is_strict() -> bool:
    """Whether this process runs MKL in a strict reproducibility mode (read at MKL load, so from the environment)."""
    return os.environ.get("MKL_CBWR", "").upper().endswith("STRICT")


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Toggle oneDNN (mkldnn) for the block; unlike ``torch.backends.mkldnn.flags`` it leaves TF32 settings alone.

    Batch-invariant CPU runs turn it off: the oneDNN convolution rounds differently than the native one,
    and which one runs must not differ between the rollout and the trainer.
    """
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (None: unchanged), then restore the count.

    Measured on CPU (torch 2.13, MKL strict): the tiny transformer's bits agree at 1 and 2 threads but change
    at 3 and at 4, so the trainer recomputes log-probs with the replicas' thread count.
    """
    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def _rows(value: Any) -> int:
    return value.shape[0] if isinstance(value, torch.Tensor) else len(value)


def pad_rows(value: torch.Tensor | list, rows: int, fill: Any = None) -> torch.Tensor | list:
    """``value`` (a tensor or list, rows first) grown to ``rows`` rows.

    ``fill`` None repeats the last real row (always a valid input to the model); otherwise the padding rows
    are ``fill`` (a number for tensors, an item for lists, e.g. ``""`` for prompts).
    """
    missing = rows - _rows(value)
    if missing < 0:
        raise ValueError(f"cannot pad {_rows(value)} rows down to {rows}")
    if missing == 0:
        return value
    if isinstance(value, torch.Tensor):
        if fill is None:
            extra = value[-1:].expand(missing, *value.shape[1:])
        else:
            extra = value.new_full((missing, *value.shape[1:]), fill)
        return torch.cat([value, extra])
    return list(value) + [value[-1] if fill is None else fill] * missing


def _take(out: Any, rows: int) -> Any:
    """The first ``rows`` rows of every tensor in ``out`` (a tensor, None, or a tuple/list of them)."""
    if out is None:
        return None
    if isinstance(out, torch.Tensor):
        return out[:rows]
    return type(out)(_take(o, rows) for o in out)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return first if len(parts) == 1 else torch.cat(parts)
    return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))


def map_chunks(
    fn: Callable[..., Any],
    inputs: Sequence[torch.Tensor | list | None],
    chunk_size: int | None,
    fill: Any = None,
) -> Any:
    """``fn(*inputs)`` evaluated on consecutive row chunks of exactly ``chunk_size`` rows, the last one padded.

    ``inputs`` share their first (row) dimension; None entries are passed through as None. ``fn`` returns a
    tensor, None, or a tuple/list of them, rows first; the chunks' outputs are concatenated with the padding
    rows dropped, so padding never reaches a loss (no gradient, no metric) and the result has one row per
    input row. ``chunk_size`` None: one call on all rows (free batching). Per-row inputs other than tensors
    and lists (a scalar sigma, the model) belong in ``fn``'s closure.
    """
    present = [x for x in inputs if x is not None]
    if not present:
        raise ValueError("map_chunks needs at least one row input")
    n = _rows(present[0])
    if any(_rows(x) != n for x in present):
        raise ValueError(f"map_chunks inputs differ in rows: {[_rows(x) for x in present]}")
    if chunk_size is None or n == 0:
        return fn(*inputs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be >= 1")
    parts = []
    for start in range(0, n, chunk_size):
        real = min(chunk_size, n - start)
        args = [None if x is None else pad_rows(x[start : start + real], chunk_size, fill) for x in inputs]
        parts.append(_take(fn(*args), real))
    return _concat(parts)
