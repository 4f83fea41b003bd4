"""How many bytes of tensor data a value holds in this process: the data-plane measure of what a process (the
driver, above all) materialises, for the trainer's metrics and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def held_bytes(value: Any) -> int:
    """Bytes of the tensors, arrays and byte strings inside ``value`` (nested mappings, lists and tuples).

    An ``ObjectRef`` counts 0: its data stays in Ray's object store until someone ``ray.get``s it, so a payload
    of refs costs the process that passes it on nothing. Other leaves (numbers, strings, configs) count 0 too.
    """
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(held_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(held_bytes(v) for v in value)
    return 0
