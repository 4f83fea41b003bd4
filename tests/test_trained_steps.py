"""Which recorded steps are trained (FlowGRPO's timestep_fraction), against the reference's int(T * fraction)."""

from __future__ import annotations

import pytest

from verl_omni.trainer.flowgrpo.trained_steps import trained_step_count


@pytest.mark.parametrize(
    ("steps", "window", "fraction", "expected"),
    [
        (10, None, 0.99, 9),  # the reference SD3 configs: the sigma -> 0 step is sampled, not trained
        (10, None, 1.0, 10),
        (8, None, 0.99, 7),
        (10, None, 0.5, 5),
        (10, [2, 5], 0.99, 3),  # a window that ends before the cut trains all its steps
        (10, [6, 10], 0.99, 3),  # ... one that reaches it loses its last step
    ],
)
def test_trained_steps_are_the_first_int_t_times_fraction(steps, window, fraction, expected):
    assert trained_step_count(steps, window, fraction) == expected


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        ("0.0", r"timestep_fraction=0\.0 is outside the valid range \(0, 1\]"),
        ("1.01", r"timestep_fraction=1\.01 is outside the valid range"),
        ("half", r"timestep_fraction='half' is outside the valid range"),
    ],
)
def test_bad_fraction_names_the_key(fraction, message):
    """The range is the recipe schema's; the rule against the SDE window is trained_step_count's."""
    from recipes.flowgrpo.config_compose import compose_recipe
    from recipes.flowgrpo.schema import parse_recipe_config

    with pytest.raises(ValueError, match=r"actor_rollout_ref\.actor\." + message):
        parse_recipe_config(compose_recipe(f"actor_rollout_ref.actor.timestep_fraction={fraction}"))


def test_a_fraction_that_trains_no_recorded_step_names_the_key():
    with pytest.raises(
        ValueError, match=r"actor_rollout_ref\.actor\.timestep_fraction=0\.05 trains the steps before index 0"
    ):
        trained_step_count(10, None, 0.05)
