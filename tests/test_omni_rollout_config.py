"""OmniRolloutConfig: verl converts the rollout section by `_target_`; server_routing must survive it."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import open_dict
from verl.utils.config import omega_conf_to_dataclass

from verl_omni.workers.config.rollout import OmniRolloutConfig, ensure_omni_rollout_target
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig


def _rollout_section():
    with initialize_config_module("verl.trainer.config", version_base=None):
        cfg = compose("ppo_trainer", overrides=["actor_rollout_ref.rollout.name=vllm"])
    return cfg.actor_rollout_ref.rollout


def test_stock_section_with_server_routing_is_retargeted():
    rollout = _rollout_section()
    with open_dict(rollout):
        rollout.server_routing = {"policy": "prompt_uid_affinity", "max_imbalance": 3}
    ensure_omni_rollout_target(rollout)
    converted = omega_conf_to_dataclass(rollout)
    assert isinstance(converted, OmniRolloutConfig)
    assert converted.server_routing == RolloutServerRoutingConfig(policy="prompt_uid_affinity", max_imbalance=3)


def test_section_without_server_routing_is_left_alone():
    rollout = _rollout_section()
    ensure_omni_rollout_target(rollout)
    assert rollout._target_ == "verl.workers.config.RolloutConfig"


def test_bad_policy_fails_at_conversion_with_full_key():
    rollout = _rollout_section()
    with open_dict(rollout):
        rollout.server_routing = {"policy": "nope"}
    ensure_omni_rollout_target(rollout)
    with pytest.raises(Exception, match=r"actor_rollout_ref\.rollout\.server_routing\.policy='nope'"):
        omega_conf_to_dataclass(rollout)
