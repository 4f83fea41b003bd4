"""verl's ``RolloutConfig`` extended with the overlay's ``server_routing`` section.

verl converts ``actor_rollout_ref.rollout`` to a dataclass in several places (replicas, agent-loop
workers) through its ``_target_``; a plain ``RolloutConfig`` rejects unknown keys, so configs that
carry ``server_routing`` target this subclass instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, open_dict
from verl.workers.config import RolloutConfig

from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig

OMNI_ROLLOUT_CONFIG_TARGET = "verl_omni.workers.config.rollout.OmniRolloutConfig"
_VERL_ROLLOUT_CONFIG_TARGETS = ("verl.workers.config.RolloutConfig", "verl.workers.config.rollout.RolloutConfig")


@dataclass
class OmniRolloutConfig(RolloutConfig):
    """Rollout config with a validated ``server_routing`` section."""

    _target_: str = OMNI_ROLLOUT_CONFIG_TARGET
    server_routing: RolloutServerRoutingConfig = field(default_factory=RolloutServerRoutingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.server_routing, RolloutServerRoutingConfig):
            routing = RolloutServerRoutingConfig.from_config(
                self.server_routing, prefix="actor_rollout_ref.rollout.server_routing"
            )
            object.__setattr__(self, "server_routing", routing)


def ensure_omni_rollout_target(rollout_config: Any) -> None:
    """Point a verl rollout section that carries ``server_routing`` at :class:`OmniRolloutConfig`.

    Lets users add ``server_routing`` to a stock verl config without editing its ``_target_``.
    """
    if not isinstance(rollout_config, DictConfig) or "server_routing" not in rollout_config:
        return
    if rollout_config.get("_target_") in (None, *_VERL_ROLLOUT_CONFIG_TARGETS):
        with open_dict(rollout_config):
            rollout_config._target_ = OMNI_ROLLOUT_CONFIG_TARGET
