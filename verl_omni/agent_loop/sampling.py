"""Per-request sampling parameters for diffusion rollouts.

Each request carries its full sampling parameters (not just the seed) so a replica's output is
determined by the request alone; the seed comes from (base seed, global step, global row index).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from verl_omni.utils.seeding import row_seed
from verl_omni.workers.config.diffusion import DiffusionRolloutConfig

__all__ = ["SAMPLING_KEYS", "row_seed", "sampling_params"]

# Fields of the diffusion config that are per-request sampling parameters.
SAMPLING_KEYS = (
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "noise_level",
    "sde_window",
    "height",
    "width",
)


def sampling_params(rollout_config: Any, *, validate: bool) -> dict[str, Any]:
    """Sampling params shared by a call's requests: the ``rollout.diffusion`` defaults, with
    ``rollout.diffusion_val`` overrides for validation. Each request adds its row's ``seed``."""
    diffusion = DiffusionRolloutConfig.from_config(_get(rollout_config, "diffusion"))
    params = {key: getattr(diffusion, key) for key in SAMPLING_KEYS}
    if validate:
        overrides = _get(rollout_config, "diffusion_val") or {}
        if isinstance(overrides, DictConfig):
            overrides = OmegaConf.to_container(overrides, resolve=True)
        unknown = sorted(set(overrides) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(
                f"actor_rollout_ref.rollout.diffusion_val has unknown key(s) {unknown}; valid: {list(SAMPLING_KEYS)}"
            )
        params.update(overrides)
    return {k: v for k, v in params.items() if v is not None}


def _get(section: Any, key: str) -> Any:
    if section is None:
        return None
    if hasattr(section, "get"):
        return section.get(key)
    return getattr(section, key, None)
