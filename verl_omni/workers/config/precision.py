"""Start-up check of the rollout's and the trainer's compute precision.

Torch-free (read before Ray and any model). FlowGRPO's first inner step is on-policy only if the old log-probs are
the trainer's own function of the stored transitions: either the rollout computes exactly what the trainer does
(same dtype; under ``batch_invariant`` the same chunk shapes) or the trainer recomputes them
(``actor.recompute_old_log_prob``).
"""

from __future__ import annotations

from typing import Any

from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX, DiffusionRolloutConfig

ACTOR = "actor_rollout_ref.actor"
PARAM_DTYPE_KEY = f"{ACTOR}.fsdp_config.mixed_precision.param_dtype"
RECOMPUTE_KEY = f"{ACTOR}.recompute_old_log_prob"
IS_THRESHOLD_KEY = f"{ACTOR}.rollout_is_threshold"


def rollout_compute_dtype(diffusion: DiffusionRolloutConfig, rollout_dtype: Any, on_gpu: bool) -> str:
    """The dtype the replicas sample in: ``diffusion.dtype``, where ``auto`` is float32 on CPU and the rollout's
    ``dtype`` (verl's ``actor_rollout_ref.rollout.dtype``, bfloat16 by default) on GPU, as the engine resolves it."""
    if diffusion.dtype != "auto":
        return diffusion.dtype
    return str(rollout_dtype or "bfloat16") if on_gpu else "float32"


def precision_warning(cfg: Any, diffusion: DiffusionRolloutConfig, gpus_available: bool) -> str | None:
    """A warning when the rollout samples in another dtype than the trainer computes in and the trainer does not
    recompute the old log-probs: the first inner step is then off-policy whatever the weights (measured on CPU
    with the tiny model, fp32 rollout and bf16 training: 81% of the rows clipped at clip_ratio 1e-4)."""
    actor = cfg.actor_rollout_ref.actor
    if actor.get("recompute_old_log_prob", False):
        return None
    on_gpu = diffusion.device == "cuda" or (diffusion.device == "auto" and gpus_available)
    sampled = rollout_compute_dtype(diffusion, cfg.actor_rollout_ref.rollout.get("dtype"), on_gpu)
    mixed = ((actor.get("fsdp_config") or {}).get("mixed_precision") or {}) if actor is not None else {}
    trained = mixed.get("param_dtype", "float32")
    if sampled == trained:
        return None
    shown = f"{diffusion.dtype} ({sampled} on {'GPU' if on_gpu else 'CPU'})" if diffusion.dtype == "auto" else sampled
    return (
        f"{DIFFUSION_CONFIG_PREFIX}.dtype={shown} but {PARAM_DTYPE_KEY}={trained}: the rollout's log-probs are "
        f"not the trainer's, so the first inner step is off-policy before any update (most rows clipped at a small "
        f"clip_ratio). Set {RECOMPUTE_KEY}=true (the trainer recomputes the old log-probs at its precision), or "
        "give both the same dtype"
    )
