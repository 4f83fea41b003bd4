"""Diffusion agent loop, its worker and manager; importing ``diffusion_agent_loop`` registers
``diffusion_single_turn_agent``. Names load on first use, so light submodules (``sampling``) import
without verl."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DIFFUSION_AGENT_NAME": "verl_omni.agent_loop.diffusion_agent_loop",
    "DiffusionSingleTurnAgentLoop": "verl_omni.agent_loop.diffusion_agent_loop",
    "DiffusionAgentLoopWorker": "verl_omni.agent_loop.diffusion_worker",
    "OmniAgentLoopManager": "verl_omni.agent_loop.manager",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'verl_omni.agent_loop' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
