"""Schema of ``actor_rollout_ref.actor.ema`` (torch-free: the recipe checks it before torch loads)."""

from __future__ import annotations

from verl_omni.workers.config.schema import Section, option, section

EMA_PREFIX = "actor_rollout_ref.actor.ema"


@section(EMA_PREFIX)
class EMAConfig(Section):
    """EMA of the trained weights (:class:`verl_omni.workers.ema.EMAWeights`): on or off, its decay and how many
    optimizer steps apart it moves."""

    enable: bool = False
    decay: float = option(0.9, ge=0, lt=1)
    update_every: int = option(8, ge=1, note="optimizer steps")
