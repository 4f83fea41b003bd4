"""verl's ``RolloutConfig`` extended with the overlay's ``server_routing`` and ``diffusion`` sections.

verl converts ``actor_rollout_ref.rollout`` to a dataclass in several places (replicas, agent-loop
workers) through its ``_target_``; a plain ``RolloutConfig`` rejects unknown keys, so configs that
carry ``server_routing`` target this subclass instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, open_dict
from verl.workers.config import RolloutConfig

from verl_omni.workers.config.diffusion import DiffusionRolloutConfig
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig

OMNI_ROLLOUT_CONFIG_TARGET = "verl_omni.workers.config.rollout.OmniRolloutConfig"
OMNI_ROLLOUT_SECTIONS = ("server_routing", "diffusion", "diffusion_val")
_VERL_ROLLOUT_CONFIG_TARGETS = ("verl.workers.config.RolloutConfig", "verl.workers.config.rollout.RolloutConfig")


@dataclass
class OmniRolloutConfig(RolloutConfig):
    """Rollout config with validated ``server_routing`` and ``diffusion`` (diffusers backend) sections."""

    _target_: str = OMNI_ROLLOUT_CONFIG_TARGET
    server_routing: RolloutServerRoutingConfig = field(default_factory=RolloutServerRoutingConfig)
    diffusion: DiffusionRolloutConfig = field(default_factory=DiffusionRolloutConfig)
    # Sampling overrides for validation rollouts (e.g. more steps, noise_level 0); see agent_loop.sampling.
    diffusion_val: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        # verl builds this class from the YAML section: the overlay's sections arrive as dicts, checked here
        object.__setattr__(self, "server_routing", RolloutServerRoutingConfig.from_config(self.server_routing))
        object.__setattr__(self, "diffusion", DiffusionRolloutConfig.from_config(self.diffusion))


def ensure_omni_rollout_target(rollout_config: Any) -> None:
    """Point a verl rollout section that carries ``server_routing`` or ``diffusion`` at :class:`OmniRolloutConfig`.

    Lets users add these sections to a stock verl config without editing its ``_target_``.
    """
    if not isinstance(rollout_config, DictConfig) or not any(k in rollout_config for k in OMNI_ROLLOUT_SECTIONS):
        return
    if rollout_config.get("_target_") in (None, *_VERL_ROLLOUT_CONFIG_TARGETS):
        with open_dict(rollout_config):
            rollout_config._target_ = OMNI_ROLLOUT_CONFIG_TARGET
