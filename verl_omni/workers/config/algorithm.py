"""Schema of the ``algorithm`` section: which RL algorithm the one FlowGRPO trainer runs, and its options.

Torch-free, so the recipe checks it before torch, verl or Ray load. ``name`` picks the algorithm; each algorithm
with options has its own subsection (``algorithm.fast``, ``algorithm.mix``), and a subsection changed from its
defaults while another algorithm is chosen is refused (:func:`check_algorithm_options`): an option that would be
ignored silently is most likely a mistake. The window rules that need the schedule live in
:mod:`verl_omni.trainer.flowgrpo.sde_windows`. Docs: docs/advanced_features/algorithms.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from verl_omni.workers.config.schema import ConfigError, Section, option, section

ALGORITHM_PREFIX = "algorithm"
# flow_grpo: every step SDE (or the fixed rollout.diffusion.sde_window); flow_grpo_fast: a random SDE window per
# prompt group; mix_grpo: one SDE window for the whole batch that slides over the schedule as training advances;
# grpo_guard: flow_grpo's sampling with GRPO-Guard's per-step ratio normalisation in the clipped loss.
ALGORITHMS: tuple[str, ...] = ("flow_grpo", "flow_grpo_fast", "mix_grpo", "grpo_guard")
_WINDOW_RANGE = "must be [start, end) step indices (two ints) or null"
# algorithm -> its options subsection
OPTION_SECTIONS: dict[str, str] = {"flow_grpo_fast": "fast", "mix_grpo": "mix"}


@section(f"{ALGORITHM_PREFIX}.fast")
class FastOptions(Section):
    """Flow-GRPO-Fast: each prompt group samples with the SDE on ``window_size`` consecutive steps placed at random
    inside ``window_range`` (ODE elsewhere) and trains on those steps only.

    window_size: SDE steps per trajectory (the paper: 1-2; the authors' fast configs: 3 of 10).
    window_range: ``[low, high)`` step indices the window lies in; null = the first half of the schedule,
        ``[0, num_inference_steps // 2)``, as the authors' configs.
    cfg: allow classifier-free guidance (``rollout.diffusion.guidance_scale > 1``); the authors train Fast without it.
    """

    window_size: int = option(2, ge=1, note="SDE steps per trajectory")
    window_range: list[int] | None = option(None, why=_WINDOW_RANGE)
    cfg: bool = False


@section(f"{ALGORITHM_PREFIX}.mix")
class MixOptions(Section):
    """MixGRPO's sliding window: every sample of a step uses the same ``window_size`` SDE steps (ODE elsewhere); the
    window starts at ``window_range[0]`` and moves ``shift`` steps later every ``shift_every`` training steps; past the
    last position it starts over (``roll_back``) or stays there.

    window_range: null = the trained part of the schedule, ``[0, int(num_inference_steps * timestep_fraction))``.
    """

    window_size: int = option(4, ge=1, note="SDE steps per trajectory")
    window_range: list[int] | None = option(None, why=_WINDOW_RANGE)
    shift: int = option(1, ge=1, note="schedule steps the window moves at a time")
    shift_every: int = option(25, ge=1, note="training steps between two moves")
    roll_back: bool = True


@section(ALGORITHM_PREFIX, closed=False)
class AlgorithmConfig(Section):
    """The ``algorithm`` keys the trainer reads (verl's other ``algorithm`` keys pass through).

    adv_clip_max: clip advantages to ``[-adv_clip_max, adv_clip_max]`` (reference: 5); null = no clipping.
    global_std: divide by the batch's reward std instead of each group's.
    drop_zero_advantage: leave samples whose advantage is 0 out of the update (as the reference).
    """

    name: Literal[ALGORITHMS] = "flow_grpo"
    adv_clip_max: float | None = option(None, gt=0)
    global_std: bool = False
    drop_zero_advantage: bool = True
    fast: FastOptions = Field(default_factory=FastOptions)
    mix: MixOptions = Field(default_factory=MixOptions)

    def __post_init__(self) -> None:
        check_algorithm_options(self)


def check_algorithm_options(config: AlgorithmConfig) -> None:
    """Refuse options of an algorithm other than ``config.name`` that differ from their defaults."""
    defaults = {"fast": FastOptions(), "mix": MixOptions()}
    own = OPTION_SECTIONS.get(config.name)
    for name, default in defaults.items():
        given = getattr(config, name)
        if name == own or given == default:
            continue
        changed = next(k for k in type(default).__pydantic_fields__ if getattr(given, k) != getattr(default, k))
        owner = next(a for a, s in OPTION_SECTIONS.items() if s == name)
        valid = f"the {ALGORITHM_PREFIX}.{own}.* keys" if own else "no algorithm options"
        raise ConfigError(
            f"{name}.{changed}={getattr(given, changed)!r} is an option of {ALGORITHM_PREFIX}.name={owner!r}, but "
            f"{ALGORITHM_PREFIX}.name={config.name!r} (which takes {valid}); valid choices: set "
            f"{ALGORITHM_PREFIX}.name={owner!r} or leave {ALGORITHM_PREFIX}.{name}.* at its defaults"
        )


def check_guard_old_policy(name: str, rollout_mode: str, recompute_old_log_prob: bool) -> None:
    """GRPO-Guard compares each transition's current mean with its mean under the weights the update starts from;
    with ``trainer.rollout_mode=one_step_off`` those are not the weights that sampled (and whose log-probs the
    rollout stored) unless the actor recomputes the old log-probs too."""
    if name == "grpo_guard" and rollout_mode != "sync" and not recompute_old_log_prob:
        raise ConfigError(
            f"{ALGORITHM_PREFIX}.name='grpo_guard' with trainer.rollout_mode={rollout_mode!r}: the normalised ratio "
            "needs the old log-probs and the old means from the same weights; valid choices: trainer.rollout_mode="
            "sync, or actor_rollout_ref.actor.recompute_old_log_prob=true"
        )
