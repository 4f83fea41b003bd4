"""Options of ``actor_rollout_ref.actor.ema`` (torch-free: the recipe checks them before torch loads)."""

from __future__ import annotations

EMA_PREFIX = "actor_rollout_ref.actor.ema"


def validate_ema_options(enable: object, decay: object, update_every: object) -> None:
    """Raise ``ValueError`` naming the key, the value and the valid range."""
    if not isinstance(enable, bool):
        raise ValueError(f"{EMA_PREFIX}.enable={enable!r} is not valid; valid choices: true, false")
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
        raise ValueError(f"{EMA_PREFIX}.decay={decay!r} is outside the valid range [0, 1)")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(f"{EMA_PREFIX}.update_every={update_every!r} must be an integer >= 1 (optimizer steps)")
