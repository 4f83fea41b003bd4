"""Helpers for ``DataProto.non_tensor_batch`` columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array holding ``values`` as they are (``np.array`` would split lists or cast strings)."""
    column = np.empty(len(values), dtype=object)
    column[:] = list(values)
    return column
