"""The per-row fields of a FlowGRPO rollout request, in one place (numpy only: the recipe checks
``server_routing.routing_key_field`` against them before verl, torch or Ray load)."""

from __future__ import annotations

from typing import Any

import numpy as np

from verl_omni.utils.arrays import object_column

# Every row of a rollout request carries these fields; ``routing_key_field`` must name one of them.
ROLLOUT_ROW_FIELDS: tuple[str, ...] = ("prompt", "uid", "prompt_index", "row_index", "request_id")
# Optional per-row column: a dict of sampling parameters the row's request sets over the shared ones (e.g. the SDE
# window an algorithm chose for the row's group).
ROW_SAMPLING_PARAMS = "sampling_params"


def rollout_rows(rows: Any, tag: str) -> dict[str, np.ndarray]:
    """The non-tensor columns for ``rows`` (a ``PromptBatch``); request ids are ``f"{tag}-row{r}"``.

    ``uid`` is the GRPO group id (new every step); ``prompt_index`` names the prompt in the prompt
    list, so routing by it (or by ``prompt``) keeps a prompt on one replica across steps. Request ids
    must be new for each rollout: a balancer may pin a request id to a replica.
    """
    return {
        "prompt": object_column(rows.prompts),
        "uid": object_column(rows.uids),
        "prompt_index": np.asarray(rows.prompt_index, dtype=np.int64),
        "row_index": np.asarray(rows.row_index, dtype=np.int64),
        "request_id": object_column([f"{tag}-row{r}" for r in rows.row_index]),
    }
