"""Image rewards for diffusion RL, picked by name from a registry (``reward.name``)."""

from verl_omni.rewards import color, jpeg, pickscore  # noqa: F401  (importing registers the built-in rewards)
from verl_omni.rewards.registry import (
    RewardFn,
    get_reward_fn,
    register_reward,
    registered_rewards,
    validate_reward_inputs,
)

__all__ = ["RewardFn", "get_reward_fn", "register_reward", "registered_rewards", "validate_reward_inputs"]
