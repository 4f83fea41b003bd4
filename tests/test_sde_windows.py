"""Algorithm choice and SDE windows (Flow-GRPO-Fast, MixGRPO): where each step's window lies, and the config
errors that name the key, the value and what is valid."""

from __future__ import annotations

import pytest

from verl_omni.trainer.flowgrpo.sde_windows import WindowSchedule, window_metrics, window_schedule
from verl_omni.workers.config.algorithm import AlgorithmConfig


def _schedule(algorithm: dict, steps: int = 8, fraction: float = 0.99, window=None, guidance: float = 1.0):
    return window_schedule(AlgorithmConfig.from_config(algorithm), steps, fraction, window, guidance)


def test_flow_grpo_has_no_window_schedule():
    assert _schedule({}) is None and _schedule({"name": "flow_grpo"}, window=[0, 2]) is None


def test_fast_defaults_to_the_first_half_and_draws_per_group():
    schedule = _schedule({"name": "flow_grpo_fast"})
    assert schedule == WindowSchedule("flow_grpo_fast", size=2, low=0, high=4)
    windows = [schedule.window(step=0, group=f"uid{i}") for i in range(200)]
    assert {w[0] for w in windows} == {0, 1, 2} and all(w[1] - w[0] == 2 for w in windows)
    # a pure function of the group's uid: the same group gets the same window, at any step and in any process
    assert schedule.window(5, "uid7") == schedule.window(0, "uid7") == windows[7]


def test_fast_window_range_and_size_are_honoured():
    schedule = _schedule({"name": "flow_grpo_fast", "fast": {"window_size": 1, "window_range": [3, 6]}})
    assert {schedule.window(0, f"g{i}") for i in range(100)} == {(3, 4), (4, 5), (5, 6)}


def test_mix_window_slides_every_shift_every_steps_and_rolls_back():
    schedule = _schedule({"name": "mix_grpo", "mix": {"window_size": 2, "shift": 2, "shift_every": 3}})
    assert (schedule.low, schedule.high) == (0, 7)  # the trained steps: int(8 * 0.99)
    starts = [schedule.window(step, "any")[0] for step in range(15)]
    assert starts == [0, 0, 0, 2, 2, 2, 4, 4, 4, 0, 0, 0, 2, 2, 2]  # last start 4 (6 would pass 7): roll back


def test_mix_without_roll_back_stays_at_the_last_position():
    schedule = _schedule({"name": "mix_grpo", "mix": {"window_size": 3, "shift_every": 1, "roll_back": False}})
    assert [schedule.window(step, "g")[0] for step in range(7)] == [0, 1, 2, 3, 4, 4, 4]
    assert schedule.window(0, "a") == schedule.window(0, "b")  # one window for the whole step


def test_window_metrics_give_the_placement_per_sample():
    metrics = window_metrics([[0, 2], [0, 2], [2, 4], [1, 3]])
    assert metrics["rollout/sde_window_start_mean"] == 0.75
    assert metrics["rollout/sde_window_start/0"] == 0.5 and metrics["rollout/sde_window_start/2"] == 0.25
    assert (metrics["rollout/sde_window_start_min"], metrics["rollout/sde_window_start_max"]) == (0.0, 2.0)
    assert metrics["rollout/sde_window_size"] == 2.0


@pytest.mark.parametrize(
    ("algorithm", "kwargs", "message"),
    [
        ({"name": "dance_grpo"}, {}, "algorithm.name='dance_grpo' is not valid; valid choices: flow_grpo, "),
        ({"name": "flow_grpo_fast", "fast": {"window_size": 0}}, {}, "algorithm.fast.window_size=0 must be a positive"),
        (
            {"name": "flow_grpo_fast", "mix": {"shift_every": 5}},
            {},
            "algorithm.mix.shift_every=5 is an option of algorithm.name='mix_grpo', but "
            "algorithm.name='flow_grpo_fast' (which takes the algorithm.fast.* keys); valid choices:",
        ),
        (
            {"name": "flow_grpo_fast", "fast": {"window_range": [2, 9]}},
            {},
            "algorithm.fast.window_range=[2, 9] is outside the trained schedule: need 0 <= start < end <= "
            "int(num_inference_steps x timestep_fraction) = int(8 x 0.99) = 7",
        ),
        (
            {"name": "mix_grpo", "mix": {"window_size": 8}},
            {},
            "algorithm.mix.window_size=8 does not fit in algorithm.mix.window_range=[0, 7] (the default): valid "
            "sizes 1 to 7",
        ),
        (
            {"name": "flow_grpo_fast", "fast": {"window_range": [1]}},
            {},
            "algorithm.fast.window_range=[1] must be [start, end) step indices (two ints) or null",
        ),
        (
            {"name": "mix_grpo"},
            {"window": [0, 2]},
            "actor_rollout_ref.rollout.diffusion.sde_window=[0, 2] with algorithm.name='mix_grpo', which places the "
            "SDE window itself",
        ),
        (
            {"name": "flow_grpo_fast"},
            {"guidance": 4.5},
            "actor_rollout_ref.rollout.diffusion.guidance_scale=4.5 with algorithm.name='flow_grpo_fast': the authors "
            "train Fast without classifier-free guidance; valid choices: actor_rollout_ref.rollout.diffusion."
            "guidance_scale=1.0, or algorithm.fast.cfg=true",
        ),
    ],
)
def test_bad_algorithm_settings_name_key_value_and_choices(algorithm, kwargs, message):
    with pytest.raises(ValueError) as err:
        _schedule(algorithm, **kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_fast_with_cfg_when_asked():
    assert _schedule({"name": "flow_grpo_fast", "fast": {"cfg": True}}, guidance=4.5).size == 2
