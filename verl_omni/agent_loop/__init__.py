"""Diffusion agent loop, its worker and manager; importing registers ``diffusion_single_turn_agent``."""

from verl_omni.agent_loop.diffusion_agent_loop import DIFFUSION_AGENT_NAME, DiffusionSingleTurnAgentLoop
from verl_omni.agent_loop.diffusion_worker import DiffusionAgentLoopWorker
from verl_omni.agent_loop.manager import OmniAgentLoopManager

__all__ = ["DIFFUSION_AGENT_NAME", "DiffusionAgentLoopWorker", "DiffusionSingleTurnAgentLoop", "OmniAgentLoopManager"]
