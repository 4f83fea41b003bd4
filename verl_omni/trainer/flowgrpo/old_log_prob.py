"""Old log-probs recomputed by the trainer (verl's default for LLM PPO), and the metrics of the rollout/trainer gap.

FlowGRPO's clipped ratio compares the current policy with the one that sampled. The rollout stores its own
log-probs; they are the sampling policy's only if the sampler and the trainer compute the same function (same
dtype casts, chunk shapes, kernels). Where they cannot (fp32 sampling with bf16 training, another GPU kernel), the
trainer recomputes the old log-probs with its current weights before the update, so the first inner step is
on-policy by construction; the gap to the rollout's is logged and, optionally, corrected with truncated
importance weights (:func:`verl_omni.trainer.flowgrpo.loss.truncated_is_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LogProbFn = Callable[[torch.Tensor, int], torch.Tensor]
"""``log_prob(rows, step) -> (len(rows),)``: the trainer's log-prob of stored transitions at one trained step."""


@torch.no_grad()
def recompute_old_log_probs(
    log_prob: LogProbFn, rollout_log_probs: torch.Tensor, rows: Sequence[int], micro_batch: int
) -> torch.Tensor:
    """The ``(N, T)`` old log-probs: the rollout's, with ``rows`` (this rank's) replaced by ``log_prob``'s value.

    Computed in micro-batches of ``micro_batch`` rows, like the update's forwards, so under batch-invariant mode
    (fixed chunk shapes) the first update step reproduces them bit for bit. No gradient, no optimizer state.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch!r} must be >= 1")
    old = rollout_log_probs.clone()
    rows = list(rows)
    for start in range(0, len(rows), micro_batch):
        idx = torch.as_tensor(rows[start : start + micro_batch])
        for t in range(old.shape[1]):
            old[idx, t] = log_prob(idx, t).detach().to(device=old.device, dtype=old.dtype)
    return old


def rollout_gap_metrics(old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> dict[str, float]:
    """How far the rollout's log-probs are from the trainer's recompute: the max and mean of ``|old - rollout|``
    and the largest ``|p_old / p_rollout - 1|`` (the ratio deviation a step without recompute would have seen)."""
    gap = (old_log_probs.double() - rollout_log_probs.double()).flatten()
    if gap.numel() == 0:
        return {}
    return {
        "actor/rollout_log_prob_gap_max": float(gap.abs().max()),
        "actor/rollout_log_prob_gap_mean": float(gap.abs().mean()),
        "actor/rollout_ratio_max_abs_dev": float(torch.expm1(gap).abs().max()),
    }
