"""Group-relative (GRPO) advantages: each reward is compared with the other samples of its prompt (same ``uid``).

Follows FlowGRPO's reference ``PerPromptStatTracker``: population std (``ddof=0``), ``eps`` added to the std,
then optional clipping to ``[-clip_max, clip_max]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch


def _group_index(uids: Sequence[str], n: int) -> tuple[torch.Tensor, int]:
    """Map each uid to a dense group id (order of first appearance)."""
    if len(uids) != n:
        raise ValueError(f"got {n} rewards but {len(uids)} uids; need one uid per reward")
    ids: dict[str, int] = {}
    index = [ids.setdefault(uid, len(ids)) for uid in uids]
    return torch.tensor(index, dtype=torch.long), len(ids)


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.ndim != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor (one reward per sample), got {shape}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a reward function failed for some sample")
    return rewards.detach().to(torch.float64)


def _group_mean_std(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean and population std, each of shape (num_groups,)."""
    counts = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, torch.ones_like(values))
    mean = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, values) / counts
    sq_dev = (values - mean[group]) ** 2
    var = torch.zeros(num_groups, dtype=values.dtype).index_add_(0, group, sq_dev) / counts
    return mean, var.sqrt()


def compute_group_advantages(
    rewards: torch.Tensor,
    uids: Sequence[str],
    global_std: bool = False,
    eps: float = 1e-4,
    clip_max: float | None = None,
) -> torch.Tensor:
    """``A_i = (r_i - mean(r_group)) / (std + eps)``, clipped to ``[-clip_max, clip_max]`` when given.

    ``std`` is the std of the sample's group, or of the whole batch with ``global_std`` (steadier when groups
    are small or nearly uniform). A reward equal to its group's mean (every reward of a constant group) gets
    advantage exactly 0: it carries no signal (see :func:`nonzero_advantage_rows`).
    Returns float32 of shape ``(N,)`` on the rewards' device.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if clip_max is not None and not clip_max > 0:
        raise ValueError(f"clip_max must be > 0 or None, got {clip_max!r}")
    values = _check_rewards(rewards).cpu()
    group, num_groups = _group_index(uids, values.numel())
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    mean, std = _group_mean_std(values, group, num_groups)
    scale = values.std(correction=0) if global_std else std[group]
    advantages = (values - mean[group]) / (scale + eps)
    advantages[~nonzero_advantage_rows(values, uids)] = 0.0  # exactly: float rounding leaves ~1e-13 there
    if clip_max is not None:
        advantages = advantages.clamp(-clip_max, clip_max)
    return advantages.to(device=rewards.device, dtype=torch.float32)


def group_reward_stats(rewards: torch.Tensor, uids: Sequence[str], zero_std_tol: float = 1e-6) -> dict[str, float]:
    """Batch and per-group reward statistics for the tracker.

    ``zero_std_group_frac`` is the share of groups whose rewards are (nearly) identical: those give no
    gradient, so a high value means the reward saturated or the sampler lost diversity.
    """
    values = _check_rewards(rewards).cpu()
    group, num_groups = _group_index(uids, values.numel())
    if values.numel() == 0:
        return {"num_groups": 0.0}
    _, std = _group_mean_std(values, group, num_groups)
    sizes = torch.bincount(group, minlength=num_groups)
    return {
        "mean": values.mean().item(),
        "std": values.std(correction=0).item(),
        "min": values.min().item(),
        "max": values.max().item(),
        "num_groups": float(num_groups),
        "group_size_min": float(sizes.min().item()),
        "group_size_max": float(sizes.max().item()),
        "group_std_mean": std.mean().item(),
        "zero_std_group_frac": (std <= zero_std_tol).double().mean().item(),
    }


def nonzero_advantage_rows(rewards: torch.Tensor, uids: Sequence[str]) -> torch.Tensor:
    """Bool ``(N,)``: rows whose advantage is not 0, i.e. whose reward differs from its group's mean.

    The reference trainer keeps a sample only if its advantage is nonzero, per sample: every sample of a group
    of identical rewards drops out, and so does a sample whose reward is exactly its group's mean (the middle
    one of 0, 1, 2). The comparison is exact, in rationals (``n * r_i == sum(r)``): in floating point the mean
    of three 0.1 rewards is 0.10000000000000002, which would leave a constant group a 1e-13 advantage and keep
    it where the math gives 0 (the reference's float test does keep such a group).
    """
    values = _check_rewards(rewards).cpu()
    group, num_groups = _group_index(uids, values.numel())
    exact = [Fraction(v) for v in values.tolist()]  # a float converts to a rational without rounding
    sums = [Fraction(0)] * num_groups
    counts = [0] * num_groups
    for g, value in zip(group.tolist(), exact, strict=True):
        sums[g] += value
        counts[g] += 1
    return torch.tensor(
        [counts[g] * value != sums[g] for g, value in zip(group.tolist(), exact, strict=True)], dtype=torch.bool
    )
