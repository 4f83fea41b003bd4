"""Diffusion agent loop, its worker and manager; importing ``diffusion_agent_loop`` registers
``diffusion_single_turn_agent``. Names load on first use, so light submodules (``sampling``) import
without verl."""

from __future__ import annotations

from verl_omni.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "DIFFUSION_AGENT_NAME": "verl_omni.agent_loop.diffusion_agent_loop",
    "DiffusionSingleTurnAgentLoop": "verl_omni.agent_loop.diffusion_agent_loop",
    "DiffusionAgentLoopWorker": "verl_omni.agent_loop.diffusion_worker",
    "OmniAgentLoopManager": "verl_omni.agent_loop.manager",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
