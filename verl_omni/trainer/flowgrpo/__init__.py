"""FlowGRPO (Liu et al. 2025): group-relative advantages and the clipped-ratio loss for flow-matching SDE rollouts."""

from verl_omni.trainer.flowgrpo.advantages import compute_group_advantages, group_reward_stats
from verl_omni.trainer.flowgrpo.loss import flowgrpo_policy_loss

__all__ = ["compute_group_advantages", "flowgrpo_policy_loss", "group_reward_stats"]
