"""Start-up checks of the old-log-prob options and of the rollout's and the trainer's compute precision.

Torch-free (read before Ray and any model). FlowGRPO's first inner step is on-policy only if the old log-probs are
the trainer's own function of the stored transitions: either the rollout computes exactly what the trainer does
(same dtype; under ``batch_invariant`` the same chunk shapes) or the trainer recomputes them
(``actor.recompute_old_log_prob``).
"""

from __future__ import annotations

import math
from typing import Any

from verl_omni.workers.config.diffusion import DIFFUSION_CONFIG_PREFIX, DiffusionRolloutConfig

ACTOR = "actor_rollout_ref.actor"
PARAM_DTYPE_KEY = f"{ACTOR}.fsdp_config.mixed_precision.param_dtype"
RECOMPUTE_KEY = f"{ACTOR}.recompute_old_log_prob"
IS_THRESHOLD_KEY = f"{ACTOR}.rollout_is_threshold"
WARN_CLIP_KEY = "trainer.warn_clip_frac_first"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_old_log_prob_options(actor: Any, trainer: Any) -> None:
    """``recompute_old_log_prob`` (bool), ``rollout_is_threshold`` (null or > 0, only with recompute) and
    ``trainer.warn_clip_frac_first`` (a share in [0, 1]); raises ``ValueError`` naming the key, value and fix."""
    recompute = actor.get("recompute_old_log_prob", False)
    if not isinstance(recompute, bool):
        raise ValueError(f"{RECOMPUTE_KEY}={recompute!r} is not valid; valid choices: true, false")
    threshold = actor.get("rollout_is_threshold")
    if threshold is not None:
        if not _is_number(threshold) or threshold <= 0:
            raise ValueError(
                f"{IS_THRESHOLD_KEY}={threshold!r} must be a finite number > 0 (the cap C of the truncated importance "
                "weights min(p_old / p_rollout, C); verl's default is 2.0) or null (no correction)"
            )
        if not recompute:
            raise ValueError(
                f"{IS_THRESHOLD_KEY}={threshold!r} corrects between the rollout's and the trainer's recomputed "
                f"log-probs, but {RECOMPUTE_KEY}=false (no recompute, every weight would be 1); set "
                f"{RECOMPUTE_KEY}=true or {IS_THRESHOLD_KEY}=null"
            )
    warn = trainer.get("warn_clip_frac_first", 0.05)
    if not _is_number(warn) or not 0 <= warn <= 1:
        raise ValueError(
            f"{WARN_CLIP_KEY}={warn!r} must be a share in [0, 1] (warn when the first inner step clips more of its "
            "rows than this)"
        )


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
