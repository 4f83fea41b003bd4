"""FlowGRPO (Liu et al. 2025): group-relative advantages and the clipped-ratio loss for flow-matching SDE rollouts.

Names load on first use, so torch-free submodules (``kl_forms``, ``trained_steps``, ``rollout_batch``) import
without torch.
"""

from __future__ import annotations

from verl_omni.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "compute_group_advantages": "verl_omni.trainer.flowgrpo.advantages",
    "group_reward_stats": "verl_omni.trainer.flowgrpo.advantages",
    "flowgrpo_policy_loss": "verl_omni.trainer.flowgrpo.loss",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
