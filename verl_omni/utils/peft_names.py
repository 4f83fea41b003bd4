"""LoRA tensor names with and without peft's model prefix: the trainer exports them without it (diffusers' peft
integration), vLLM parses them with it; both rollout backends convert through here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PEFT_PREFIX = "base_model.model."


def with_peft_prefix(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Names as peft saves them (``base_model.model.<module>.lora_A.weight``)."""
    return {(k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k): v for k, v in tensors.items()}


def without_peft_prefix(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Names relative to the model the adapter is on (``<module>.lora_A.weight``)."""
    return {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
