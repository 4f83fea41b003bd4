"""SDE windows chosen per prompt group and per training step (Flow-GRPO-Fast, MixGRPO).

Both algorithms sample with the SDE on a short window of consecutive steps and with the ODE elsewhere, and train
on the window's steps only; they differ in where the window is:

- ``flow_grpo_fast`` (Flow-GRPO-Fast, Liu et al.): at a random start inside ``window_range``. The authors draw one
  window per sampling call; here each prompt group draws its own, from a stable hash of its ``uid`` (itself a
  function of the seed, the step and the group), so a group's copies share one window and still fuse into one
  denoising batch on their replica, and a resumed run redraws the same windows.
- ``mix_grpo`` (MixGRPO, Li et al. 2025): one window for the whole step, starting at ``window_range[0]`` and moving
  ``shift`` steps later after the training steps its ``schedule`` gives for the position it is at (``constant``:
  ``shift_every``; ``decay``, ``exp_decay``: fewer as it moves; ``roll_back``: start over past the end), or, with
  ``schedule=random``, at a start drawn per step from a stable hash of the run's seed and the step. The start is a
  pure function of the training step (and seed), so a resumed run takes the same windows.

The window travels as the request's ``sde_window`` sampling parameter (the rollout engines already sample and
record exactly that window), so nothing in the engines or the trainer's recompute differs per algorithm. Every
window has ``window_size`` steps and lies in the trained part of the schedule, so every row trains on all
``window_size`` recorded steps. Torch-free: the recipe checks a config with :func:`window_schedule` before
torch loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from verl_omni.utils.seeding import stable_int
from verl_omni.workers.config.algorithm import ALGORITHM_PREFIX, OPTION_SECTIONS, AlgorithmConfig

SDE_WINDOW_KEY = "actor_rollout_ref.rollout.diffusion.sde_window"
GUIDANCE_KEY = "actor_rollout_ref.rollout.diffusion.guidance_scale"


@dataclass(frozen=True)
class WindowSchedule:
    """Where the SDE window of a step's groups lies: ``[start, start + size)`` with ``low <= start <= high - size``.

    MixGRPO's fields (``shift`` onwards) are :class:`~verl_omni.workers.config.algorithm.MixOptions`'."""

    algorithm: str
    size: int
    low: int
    high: int
    shift: int = 1
    shift_every: int = 1
    roll_back: bool = True
    schedule: str = "constant"
    shift_every_max: int = 10
    shift_every_min: int = 1
    decay_threshold: int = 13
    decay_rate: float = 0.1

    @property
    def positions(self) -> int:
        """How many starts the window can take."""
        return self.high - self.size - self.low + 1

    def starts(self) -> list[int]:
        """MixGRPO's window starts in the order it takes them: ``low``, ``low + shift``, ... up to the last start
        ``high - size``; without ``roll_back`` it ends at that last start even when ``shift`` skips it."""
        last = self.high - self.size
        starts = list(range(self.low, last + 1, self.shift))
        if not self.roll_back and starts[-1] != last:
            starts.append(last)
        return starts

    def stay(self, start: int) -> int:
        """MixGRPO: the training steps the window stays at ``start`` before it moves (at least 1)."""
        if self.schedule == "decay":  # linear from shift_every_max at ``low`` to shift_every_min at ``high``
            span, done = self.high - self.low, start - self.low  # integers: floor exactly, no float rounding
            linear = (self.shift_every_max * (span - done) + self.shift_every_min * done) // span
            return max(self.shift_every_min, linear)
        if self.schedule == "exp_decay":  # shift_every up to decay_threshold, then exponentially fewer
            past = max(0, start - self.decay_threshold)
            return math.ceil(self.shift_every * math.exp(-self.decay_rate * past))
        return self.shift_every

    def mix_start(self, step: int, seed: int = 0) -> int:
        """MixGRPO: the window's start at training step ``step`` (0-based), from the step alone (``random``: and
        the run's ``seed``)."""
        if self.schedule == "random":  # every start of the range alike, one draw for the whole step
            return self.low + stable_int("mix_window", seed, step) % self.positions
        starts = self.starts()
        stays = [self.stay(start) for start in starts]
        if self.roll_back:
            step %= sum(stays)
        for start, stay in zip(starts, stays, strict=True):
            if step < stay:
                return start
            step -= stay
        return starts[-1]  # no roll_back: past the end, the window stays at its last start

    def window(self, step: int, group: str, seed: int = 0) -> tuple[int, int]:
        """The window of prompt group ``group`` (its uid) at training step ``step`` of a run seeded ``seed``."""
        if self.algorithm == "flow_grpo_fast":
            start = self.low + stable_int("sde_window", group) % self.positions
        else:
            start = self.mix_start(step, seed)
        return start, start + self.size


def window_schedule(
    algorithm: AlgorithmConfig,
    num_inference_steps: int,
    timestep_fraction: float,
    sde_window: Sequence[int] | None,
    guidance_scale: float,
) -> WindowSchedule | None:
    """The schedule of ``algorithm`` on an ``num_inference_steps`` schedule; None for plain FlowGRPO.

    Raises ``ValueError`` naming the key, the value and what is valid: a window range outside the schedule or
    beyond the trained steps (``timestep_fraction``), a window larger than its range, a fixed
    ``rollout.diffusion.sde_window`` beside an algorithm that places the window itself, CFG with Fast unless
    ``algorithm.fast.cfg`` asks for it, or a MixGRPO ``exp_decay`` threshold at or past the window's last start
    (it would move as ``constant`` does).
    """
    section = OPTION_SECTIONS.get(algorithm.name)
    if section not in ("fast", "mix"):
        return None
    options = getattr(algorithm, section)
    prefix = f"{ALGORITHM_PREFIX}.{section}"
    if sde_window is not None:
        raise ValueError(
            f"{SDE_WINDOW_KEY}={list(sde_window)!r} with {ALGORITHM_PREFIX}.name={algorithm.name!r}, which places the "
            f"SDE window itself ({prefix}.window_size, {prefix}.window_range); valid choices: {SDE_WINDOW_KEY}=null, "
            f"or {ALGORITHM_PREFIX}.name=flow_grpo for a fixed window"
        )
    trained = int(num_inference_steps * timestep_fraction)
    default = (0, num_inference_steps // 2) if section == "fast" else (0, trained)
    given = options.window_range
    if given is None:
        low, high = default
    elif len(given) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in given):
        raise ValueError(f"{prefix}.window_range={given!r} must be [start, end) step indices (two ints) or null")
    else:
        low, high = given
    shown = f"{prefix}.window_range={[low, high]!r}" + ("" if given is not None else " (the default)")
    if not 0 <= low < high <= trained:
        raise ValueError(
            f"{shown} is outside the trained schedule: need 0 <= start < end <= int(num_inference_steps x "
            f"timestep_fraction) = int({num_inference_steps} x {timestep_fraction}) = {trained}"
        )
    if options.window_size > high - low:
        raise ValueError(
            f"{prefix}.window_size={options.window_size} does not fit in {shown}: valid sizes 1 to {high - low}"
        )
    if section == "fast":
        if guidance_scale > 1 and not options.cfg:
            raise ValueError(
                f"{GUIDANCE_KEY}={guidance_scale} with {ALGORITHM_PREFIX}.name='flow_grpo_fast': the authors train "
                f"Fast without classifier-free guidance; valid choices: {GUIDANCE_KEY}=1.0, or {prefix}.cfg=true"
            )
        return WindowSchedule(algorithm.name, options.window_size, low, high)
    schedule = WindowSchedule(
        algorithm.name,
        options.window_size,
        low,
        high,
        shift=options.shift,
        shift_every=options.shift_every,
        roll_back=options.roll_back,
        schedule=options.schedule,
        shift_every_max=options.shift_every_max,
        shift_every_min=options.shift_every_min,
        decay_threshold=options.decay_threshold,
        decay_rate=options.decay_rate,
    )
    last = schedule.starts()[-1]
    if options.schedule == "exp_decay" and options.decay_threshold >= last:
        valid = f"0 to {last - 1}" if last > 0 else f"none, the window has one start; use {prefix}.schedule='constant'"
        raise ValueError(
            f"{prefix}.decay_threshold={options.decay_threshold} is not before the window's last start {last} "
            f"({shown}, window_size {options.window_size}, shift {options.shift}): {prefix}.schedule='exp_decay' "
            f"would move the window as 'constant' does; valid choices: {valid}"
        )
    return schedule


def window_metrics(windows: Sequence[Sequence[int]]) -> dict[str, float]:
    """Where the step's windows lay: the mean, min and max start and the share of samples at each start
    (``rollout/sde_window_start/<i>``), so the placement per sample shows in the tracker."""
    starts = [int(w[0]) for w in windows]
    metrics = {
        "rollout/sde_window_start_mean": sum(starts) / len(starts),
        "rollout/sde_window_start_min": float(min(starts)),
        "rollout/sde_window_start_max": float(max(starts)),
        "rollout/sde_window_size": float(windows[0][1] - windows[0][0]),
    }
    for start in sorted(set(starts)):
        metrics[f"rollout/sde_window_start/{start}"] = starts.count(start) / len(starts)
    return metrics
