"""Schema of the ``algorithm`` section: which RL algorithm the one FlowGRPO trainer runs, and its options.

Torch-free, so the recipe checks it before torch, verl or Ray load. ``name`` picks the algorithm; each algorithm
with options has its own subsection (``algorithm.fast``, ``algorithm.mix``, ``algorithm.nft``), and a subsection
changed from its defaults while another algorithm is chosen is refused (:func:`check_algorithm_options`): an option
that would be ignored silently is most likely a mistake. The window rules that need the schedule live in
:mod:`verl_omni.trainer.flowgrpo.sde_windows`. Docs: docs/advanced_features/algorithms.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from verl_omni.workers.config.schema import ConfigError, Section, option, section

ALGORITHM_PREFIX = "algorithm"
# flow_grpo: every step SDE (or the fixed rollout.diffusion.sde_window); flow_grpo_fast: a random SDE window per
# prompt group; mix_grpo: one SDE window for the whole batch that slides over the schedule as training advances;
# grpo_guard: flow_grpo's sampling with GRPO-Guard's per-step ratio normalisation in the clipped loss;
# diffusion_nft: DiffusionNFT's forward-process objective on deterministic (ODE) samples, no log-probs, no CFG.
ALGORITHMS: tuple[str, ...] = ("flow_grpo", "flow_grpo_fast", "mix_grpo", "grpo_guard", "diffusion_nft")
_WINDOW_RANGE = "must be [start, end) step indices (two ints) or null"
# algorithm -> its options subsection
OPTION_SECTIONS: dict[str, str] = {"flow_grpo_fast": "fast", "mix_grpo": "mix", "diffusion_nft": "nft"}
# MixGRPO's window schedules (its code's sample_strategy "progressive", "decay", "exp_decay", "random"), and the
# schedules each schedule-specific option is used by: changed from its default under another schedule, it is refused
MIX_SCHEDULES: tuple[str, ...] = ("constant", "decay", "exp_decay", "random")
MIX_SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "shift": ("constant", "decay", "exp_decay"),
    "roll_back": ("constant", "decay", "exp_decay"),
    "shift_every": ("constant", "exp_decay"),
    "shift_every_max": ("decay",),
    "shift_every_min": ("decay",),
    "decay_threshold": ("exp_decay",),
    "decay_rate": ("exp_decay",),
}


def _listed(names: tuple[str, ...], conjunction: str) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``: the schedules an option is used by, for an error."""
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


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
    window starts at ``window_range[0]`` and moves ``shift`` steps later, staying at each position for the training
    steps its ``schedule`` gives; past the last position it starts over (``roll_back``) or stays there. Defaults are
    the authors' (Tencent-Hunyuan/MixGRPO); docs/advanced_features/algorithms.md cites each.

    window_range: null = the trained part of the schedule, ``[0, int(num_inference_steps * timestep_fraction))``.
    schedule: training steps the window stays at start ``s`` (``s0 = window_range[0]``, ``s1 = window_range[1]``):
        ``constant``: ``shift_every``;
        ``decay``: ``max(min, floor(max (1 - p) + min p))``, ``p = (s - s0) / (s1 - s0)``, with ``max`` and ``min``
        ``shift_every_max`` and ``shift_every_min`` (the authors' linear ``decay``);
        ``exp_decay``: ``ceil(shift_every exp(-decay_rate max(0, s - decay_threshold)))``;
        ``random``: no sliding: each training step draws its start uniformly from the range (the authors'
        ``random``), from a hash of the run's seed and the step.
    """

    window_size: int = option(4, ge=1, note="SDE steps per trajectory")
    window_range: list[int] | None = option(None, why=_WINDOW_RANGE)
    shift: int = option(1, ge=1, note="schedule steps the window moves at a time")
    schedule: Literal[MIX_SCHEDULES] = option("constant", note="how long the window stays at each position")
    shift_every: int = option(25, ge=1, note="training steps between two moves")
    shift_every_max: int = option(10, ge=1, note="decay: training steps at the first position")
    shift_every_min: int = option(1, ge=1, note="decay: training steps at the end of the range")
    decay_threshold: int = option(13, ge=0, note="exp_decay: the last window start that keeps shift_every")
    decay_rate: float = option(0.1, gt=0, note="exp_decay: the interval's decay per step past decay_threshold")
    roll_back: bool = True

    def __post_init__(self) -> None:
        prefix = f"{ALGORITHM_PREFIX}.mix"
        for key, users in MIX_SCHEDULE_KEYS.items():
            value, default = getattr(self, key), type(self).__pydantic_fields__[key].default
            if self.schedule not in users and value != default:
                raise ConfigError(
                    f"{key}={value!r} is not used by {prefix}.schedule={self.schedule!r} (only by "
                    f"{_listed(users, 'and')}); valid choices: set {prefix}.schedule to {_listed(users, 'or')}, or "
                    f"leave {prefix}.{key} at its default ({default!r})"
                )
        if self.shift_every_min > self.shift_every_max:
            raise ConfigError(
                f"shift_every_min={self.shift_every_min!r} is larger than {prefix}.shift_every_max="
                f"{self.shift_every_max!r}: the decay schedule shrinks the interval from max to min; valid "
                f"choices: 1 to {self.shift_every_max}"
            )


@section(f"{ALGORITHM_PREFIX}.nft")
class NFTOptions(Section):
    """DiffusionNFT (Zheng et al. 2025): the forward-process objective. Defaults are the authors' (NVlabs/DiffusionNFT,
    ``config/nft.py`` and ``scripts/train_nft_sd3.py``); docs/advanced_features/algorithms.md cites each.

    beta: guidance strength of the implicit policies ``v+ = (1 - beta) v_old + beta v``, ``v- = (1 + beta) v_old -
        beta v`` (authors: 1.0; their OCR and multi-reward configs 0.1).
    reward_norm: ``Z`` in reward stds: the optimality probability is ``r = 1/2 + 1/2 clip(A / Z, -1, 1)`` of the
        group-normalised advantage ``A``, and the loss is multiplied by ``Z`` (the authors' ``adv_clip_max = 5``).
    old_decay_flat, old_decay_rate, old_decay_max: the old (sampling) policy's soft update after each training step,
        ``old <- d old + (1 - d) theta`` with ``d = min(rate (k - flat), max)`` after ``k >= flat`` optimizer steps,
        else 0 (authors' ``decay_type`` 1, their default: 0, 0.001, 0.5; type 2, OCR: 75, 0.0075, 0.999; type 0:
        0, 0, 0, the old policy is the trained one).
    """

    beta: float = option(1.0, gt=0, note="guidance strength of the implicit positive / negative policies")
    reward_norm: float = option(5.0, gt=0, note="reward stds that map to r = 0 or 1")
    old_decay_flat: int = option(0, ge=0, note="optimizer steps before the old policy starts to lag")
    old_decay_rate: float = option(0.001, ge=0, note="growth of the decay per optimizer step")
    old_decay_max: float = option(0.5, ge=0, lt=1, note="the decay's ceiling")


@section(ALGORITHM_PREFIX, closed=False)
class AlgorithmConfig(Section):
    """The ``algorithm`` keys the trainer reads (verl's other ``algorithm`` keys pass through).

    adv_clip_max: clip advantages to ``[-adv_clip_max, adv_clip_max]`` (reference: 5); null = no clipping.
    global_std: divide by the batch's reward std instead of each group's.
    drop_zero_advantage: leave samples whose advantage is 0 out of the update; null = per algorithm: true for the
        GRPO algorithms (as FlowGRPO's reference), false for ``diffusion_nft`` (its authors train on every sample: at
        ``r = 1/2`` a sample still pulls the policy toward the old one).
    """

    name: Literal[ALGORITHMS] = "flow_grpo"
    adv_clip_max: float | None = option(None, gt=0)
    global_std: bool = False
    drop_zero_advantage: bool | None = None
    fast: FastOptions = Field(default_factory=FastOptions)
    mix: MixOptions = Field(default_factory=MixOptions)
    nft: NFTOptions = Field(default_factory=NFTOptions)

    def __post_init__(self) -> None:
        check_algorithm_options(self)

    @property
    def drops_zero_advantage(self) -> bool:
        """``drop_zero_advantage`` resolved: null means true except for DiffusionNFT."""
        if self.drop_zero_advantage is None:
            return self.name != "diffusion_nft"
        return self.drop_zero_advantage


def check_algorithm_options(config: AlgorithmConfig) -> None:
    """Refuse options of an algorithm other than ``config.name`` that differ from their defaults."""
    defaults = {"fast": FastOptions(), "mix": MixOptions(), "nft": NFTOptions()}
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


def check_stale_samples(name: str, rollout_mode: str, recompute_old_log_prob: bool, recentre_stale: bool) -> None:
    """How ``trainer.rollout_mode=one_step_off`` handles samples one version old. Re-centred (``actor.recentre_stale``,
    the default) each transition is moved onto the current means with the sampler's noise, so its log-prob is the
    sampler's at any weights: a recomputed old log-prob would score the un-moved sample, and GRPO-Guard's
    normalisation has no mean shift left to normalise. Not re-centred, GRPO-Guard needs the old log-probs and means
    from the same weights, so the actor recomputes them."""
    if rollout_mode == "sync":
        return
    actor = "actor_rollout_ref.actor"
    if recentre_stale and recompute_old_log_prob:
        raise ConfigError(
            f"{actor}.recompute_old_log_prob=true with trainer.rollout_mode={rollout_mode!r} and "
            f"{actor}.recentre_stale=true: a re-centred transition's log-prob is the sampler's at any weights and "
            f"precision, there is nothing to recompute; valid choices: {actor}.recompute_old_log_prob=false, or "
            f"{actor}.recentre_stale=false"
        )
    if name == "grpo_guard" and (recentre_stale or not recompute_old_log_prob):
        raise ConfigError(
            f"{ALGORITHM_PREFIX}.name='grpo_guard' with trainer.rollout_mode={rollout_mode!r}: the normalised ratio "
            "needs the old log-probs and the old means from the same weights (and re-centring leaves no mean shift "
            f"to normalise); valid choices: trainer.rollout_mode=sync, or {actor}.recentre_stale=false with "
            f"{actor}.recompute_old_log_prob=true"
        )


def check_nft_settings(
    name: str, rollout_mode: str, recompute_old_log_prob: bool, sde_window: list[int] | None
) -> None:
    """DiffusionNFT records no log-probs and samples every step deterministically: refuse the settings that need
    log-probs or an SDE window. The CFG rule needs the model family: :func:`check_nft_guidance`."""
    if name != "diffusion_nft":
        return
    where = f"{ALGORITHM_PREFIX}.name='diffusion_nft'"
    if rollout_mode != "sync":
        raise ConfigError(
            f"trainer.rollout_mode={rollout_mode!r} with {where}: one_step_off corrects the lag of its samples with "
            "log-prob ratios, which DiffusionNFT does not record (its old policy must be the one that sampled); "
            "valid choices: trainer.rollout_mode=sync"
        )
    if recompute_old_log_prob:
        raise ConfigError(
            f"actor_rollout_ref.actor.recompute_old_log_prob=True with {where}: DiffusionNFT trains on the forward "
            "process and uses no log-probs; valid choices: actor_rollout_ref.actor.recompute_old_log_prob=false"
        )
    if sde_window is not None:
        raise ConfigError(
            f"actor_rollout_ref.rollout.diffusion.sde_window={list(sde_window)!r} with {where}: DiffusionNFT samples "
            "every step deterministically and trains on the clean sample; valid choices: "
            "actor_rollout_ref.rollout.diffusion.sde_window=null"
        )


NFT_GUIDANCE_KEY = "actor_rollout_ref.rollout.diffusion.guidance_scale"


def check_nft_guidance(name: str, guidance_scale: float, true_cfg: bool) -> None:
    """DiffusionNFT is CFG-free: refuse ``guidance_scale > 1`` on a family where that runs classifier-free guidance
    (``true_cfg``; a guidance-distilled family, FLUX.1, takes the scale as a transformer input and keeps it)."""
    if name == "diffusion_nft" and true_cfg and guidance_scale > 1:
        raise ConfigError(
            f"{NFT_GUIDANCE_KEY}={guidance_scale!r} with {ALGORITHM_PREFIX}.name='diffusion_nft': DiffusionNFT is "
            f"CFG-free (the authors sample and train with guidance_scale 1.0); valid choices: {NFT_GUIDANCE_KEY}=1.0"
        )
