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


def _mix(**mix):
    """MixGRPO on 8 steps (trained: int(8 x 0.99) = 7, the range [0, 7)) with a 2-step window: starts 0 to 5."""
    return _schedule({"name": "mix_grpo", "mix": {"window_size": 2, **mix}})


def test_mix_decay_shrinks_the_interval_linearly_as_the_window_moves():
    # stay(s) = max(min, floor((max (7 - s) + min s) / 7)) = floor((4 (7 - s) + s) / 7) = floor((28 - 3 s) / 7)
    schedule = _mix(schedule="decay", shift_every_max=4, shift_every_min=1)
    assert [schedule.stay(s) for s in range(6)] == [4, 3, 3, 2, 2, 1]  # 28/7, 25/7, 22/7, 19/7, 16/7, 13/7
    starts = [0] * 4 + [1] * 3 + [2] * 3 + [3] * 2 + [4] * 2 + [5]  # 15 steps, then the window rolls back
    assert [schedule.window(step, "g")[0] for step in range(30)] == starts + starts


def test_mix_decay_defaults_on_the_authors_schedule():
    # the authors' decay: max 10, min 1 over their 23 window starts ([0, 23)), 4-step window, shift 1
    schedule = _schedule(
        {"name": "mix_grpo", "mix": {"schedule": "decay", "window_range": [0, 23]}}, steps=25, fraction=0.99
    )
    # stay(s) = max(1, floor((10 (23 - s) + s) / 23)) = floor((230 - 9 s) / 23); the last start is 23 - 4 = 19
    assert [schedule.stay(s) for s in (0, 1, 2, 3, 5, 6, 19)] == [10, 9, 9, 8, 8, 7, 2]
    assert [schedule.mix_start(t) for t in (0, 9, 10, 18, 19, 27, 28, 35, 36)] == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_mix_exp_decay_keeps_shift_every_to_the_threshold_then_decays():
    # stay(s) = ceil(4 exp(-0.5 max(0, s - 2))): 4, 4, 4, then ceil(2.43) = 3, ceil(1.47) = 2, ceil(0.89) = 1
    schedule = _mix(schedule="exp_decay", shift_every=4, decay_threshold=2, decay_rate=0.5)
    assert [schedule.stay(s) for s in range(6)] == [4, 4, 4, 3, 2, 1]
    starts = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3 + [4] * 2 + [5]  # 18 steps, then the window rolls back
    assert [schedule.window(step, "g")[0] for step in range(36)] == starts + starts
    held = _mix(schedule="exp_decay", shift_every=4, decay_threshold=2, decay_rate=0.5, roll_back=False)
    assert [held.mix_start(step) for step in range(18)] == starts and held.mix_start(1000) == 5


def test_mix_exp_decay_defaults_on_the_authors_schedule():
    # the authors' exp_decay: shift_every 25, threshold 13, rate 0.1; starts 0 to 19 of [0, 23), 4-step window
    schedule = _schedule(
        {"name": "mix_grpo", "mix": {"schedule": "exp_decay", "window_range": [0, 23]}}, steps=25, fraction=0.99
    )
    # ceil(25 exp(-0.1 k)) for k = 1..6: ceil(22.62), ceil(20.47), ceil(18.52), ceil(16.76), ceil(15.16), ceil(13.72)
    assert [schedule.stay(s) for s in range(13, 20)] == [25, 23, 21, 19, 17, 16, 14]
    # 14 starts x 25 steps = 350, then 23 + 21 + 19 + 17 + 16 + 14 = 110: a 460-step cycle
    assert [schedule.mix_start(t) for t in (349, 350, 372, 373, 445, 446, 459, 460)] == [13, 14, 14, 15, 18, 19, 19, 0]


def test_mix_decay_without_roll_back_ends_on_the_last_start_even_when_shift_skips_it():
    # starts 0, 2, 4 and then the last one, 5; stays floor((28 - 3 s) / 7): 4, 3, 2, 1
    schedule = _mix(schedule="decay", shift=2, shift_every_max=4, shift_every_min=1, roll_back=False)
    assert schedule.starts() == [0, 2, 4, 5]
    assert [schedule.mix_start(step) for step in range(11)] == [0] * 4 + [2] * 3 + [4] * 2 + [5] * 2


def test_mix_random_draws_one_start_per_step_from_the_seed_and_the_step():
    schedule = _mix(schedule="random")  # starts 0 to 5, the authors' randint(0, max_timesteps - size + 1)
    starts = [schedule.window(step, "g", seed=7)[0] for step in range(300)]
    assert set(starts) == set(range(6))  # every position of the range, uniformly: each 50 +- 5 sd in 300 draws
    assert all(20 <= starts.count(s) <= 80 for s in range(6))
    assert schedule.window(3, "a", seed=7) == schedule.window(3, "b", seed=7)  # one window for the whole step
    other = [schedule.window(step, "g", seed=8)[0] for step in range(300)]
    assert other != starts  # another run's seed, another sequence
    assert [schedule.window(step, "g", seed=7)[0] for step in reversed(range(300))] == starts[::-1]  # resumable


def test_mix_window_is_a_function_of_the_step_alone():
    # a resumed run asks for step 37 first: the same window as a run that went through steps 0 to 36
    for schedule in (_mix(schedule="decay"), _mix(schedule="exp_decay", decay_threshold=1), _mix(shift_every=3)):
        walked = [schedule.window(step, "g") for step in range(60)]
        assert [schedule.window(step, "other") for step in reversed(range(60))] == walked[::-1]


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
        (
            {"name": "mix_grpo", "mix": {"schedule": "linear"}},
            {},
            "algorithm.mix.schedule='linear' is not valid; valid choices: constant, decay, exp_decay, random",
        ),
        (
            {"name": "mix_grpo", "mix": {"schedule": "decay", "shift_every_max": 2, "shift_every_min": 3}},
            {},
            "algorithm.mix.shift_every_min=3 is larger than algorithm.mix.shift_every_max=2: the decay schedule "
            "shrinks the interval from max to min; valid choices: 1 to 2",
        ),
        (
            {"name": "mix_grpo", "mix": {"decay_rate": 0.5}},
            {},
            "algorithm.mix.decay_rate=0.5 is not used by algorithm.mix.schedule='constant' (only by 'exp_decay'); "
            "valid choices: set algorithm.mix.schedule to 'exp_decay', or leave algorithm.mix.decay_rate at its "
            "default (0.1)",
        ),
        (
            {"name": "mix_grpo", "mix": {"schedule": "decay", "shift_every": 5}},
            {},
            "algorithm.mix.shift_every=5 is not used by algorithm.mix.schedule='decay' (only by 'constant' and "
            "'exp_decay')",
        ),
        (
            {"name": "mix_grpo", "mix": {"schedule": "random", "shift": 2}},
            {},
            "algorithm.mix.shift=2 is not used by algorithm.mix.schedule='random' (only by 'constant', 'decay' and "
            "'exp_decay'); valid choices: set algorithm.mix.schedule to 'constant', 'decay' or 'exp_decay', or leave "
            "algorithm.mix.shift at its default (1)",
        ),
        (
            {"name": "mix_grpo", "mix": {"schedule": "exp_decay", "decay_rate": 0}},
            {},
            "algorithm.mix.decay_rate=0 must be a finite number > 0",
        ),
        (
            {"name": "mix_grpo", "mix": {"schedule": "exp_decay"}},
            {},
            "algorithm.mix.decay_threshold=13 is not before the window's last start 3 (algorithm.mix.window_range="
            "[0, 7] (the default), window_size 4, shift 1): algorithm.mix.schedule='exp_decay' would move the window "
            "as 'constant' does; valid choices: 0 to 2",
        ),
    ],
)
def test_bad_algorithm_settings_name_key_value_and_choices(algorithm, kwargs, message):
    with pytest.raises(ValueError) as err:
        _schedule(algorithm, **kwargs)
    assert str(err.value).startswith(message), str(err.value)


def test_fast_with_cfg_when_asked():
    assert _schedule({"name": "flow_grpo_fast", "fast": {"cfg": True}}, guidance=4.5).size == 2
