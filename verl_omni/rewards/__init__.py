"""Image rewards for diffusion RL, picked by name from a registry (``reward.name``); the built-in reward modules
(``color``, ``jpeg``, ``ocr``, ``pickscore``) load when their name is first resolved."""

from verl_omni.rewards.registry import (
    RewardFn,
    get_reward_fn,
    register_reward,
    registered_rewards,
    validate_reward_inputs,
)

__all__ = ["RewardFn", "get_reward_fn", "register_reward", "registered_rewards", "validate_reward_inputs"]
