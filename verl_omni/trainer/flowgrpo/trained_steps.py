"""Which recorded denoising steps the policy update trains on (FlowGRPO's ``timestep_fraction``).

The reference samples every step with the SDE and trains the first ``int(N * timestep_fraction)`` steps of the
``N``-step schedule (its SD3 configs: 0.99, so the last step, sigma -> 0, is sampled but never trained). With an
SDE window ``[start, end)`` only window steps are recorded; the trained ones are those with a schedule index
below ``int(N * timestep_fraction)``, which is always a prefix of the recorded steps.
"""

from __future__ import annotations

from collections.abc import Sequence

from verl_omni.pipelines.sde_window import resolve_sde_window

TIMESTEP_FRACTION_KEY = "actor_rollout_ref.actor.timestep_fraction"


def trained_step_count(num_inference_steps: int, sde_window: Sequence[int] | None, timestep_fraction: float) -> int:
    """How many of the recorded steps (a prefix) are trained; raises ``ValueError`` naming the key if none.

    ``timestep_fraction`` is a number in (0, 1], as the recipe's schema declares it."""
    start, end = resolve_sde_window(num_inference_steps, None if sde_window is None else list(sde_window))
    last = min(end, int(num_inference_steps * timestep_fraction))
    if last <= start:
        raise ValueError(
            f"{TIMESTEP_FRACTION_KEY}={timestep_fraction} trains the steps before index "
            f"{int(num_inference_steps * timestep_fraction)} of {num_inference_steps}, but the SDE window starts at "
            f"{start}: no recorded step would be trained; raise it or move the window"
        )
    return last - start
