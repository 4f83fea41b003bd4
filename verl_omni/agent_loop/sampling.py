"""Per-request sampling parameters of diffusion rollouts.

Each request carries its own seed, from (base seed, global step, global row index), so a replica's output is
determined by the request alone. The other sampling parameters default to the replica's ``rollout.diffusion``
section, applied once, by the server (:func:`~verl_omni.workers.rollout.sampling_params.resolve_sampling_params`);
a validation rollout sends only its ``rollout.diffusion_val`` overrides.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_omni.request import SAMPLING_FIELDS
from verl_omni.utils.seeding import row_seed

__all__ = ["row_seed", "sampling_params"]


def sampling_params(rollout_config: Any, *, validate: bool) -> dict[str, Any]:
    """What a call's requests send beyond their seed: nothing for training (the replica's defaults are the
    ``rollout.diffusion`` section), the ``rollout.diffusion_val`` overrides for validation."""
    if not validate:
        return {}
    overrides = rollout_config.get("diffusion_val") if rollout_config is not None else None
    if isinstance(overrides, DictConfig):
        overrides = OmegaConf.to_container(overrides, resolve=True)
    overrides = dict(overrides or {})
    valid = [k for k in SAMPLING_FIELDS if k != "seed"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"actor_rollout_ref.rollout.diffusion_val has unknown key(s) {unknown}; valid: {valid}")
    return {k: v for k, v in overrides.items() if v is not None}
