"""make chaos: the faults a seed draws and the checks each run must pass (the runs themselves: ``make chaos``)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from recipes.flowgrpo.chaos import RESULT_FILE, TARGETS, Fault, check_run, draw_faults


def test_a_seed_draws_the_same_faults_every_time_and_seeds_differ():
    draws = [draw_faults(seed, 8, 3, rollout_s=2.0, sync_s=0.1, max_replica_faults=9) for seed in range(20)]
    assert draws[0] == draw_faults(0, 8, 3, rollout_s=2.0, sync_s=0.1, max_replica_faults=9)
    assert len({tuple((f.target, f.step, f.delay_s) for f in d) for d in draws}) == 20
    assert {f.target for d in draws for f in d} == set(TARGETS)  # every kind is drawn
    for faults in draws:
        steps = [f.step for f in faults]
        assert steps == sorted(set(steps)) and steps[0] >= 1 and steps[-1] <= 6  # a step before and after each
        for f in faults:
            assert 0 <= f.delay_s <= 0.8 * (0.1 if f.target == "replica_in_sync" else 2.0) and 0 <= f.pick < 1


def test_one_replica_always_serves_when_replicas_are_not_replaced():
    for seed in range(50):
        faults = draw_faults(seed, 6, 4, rollout_s=1.0, sync_s=0.1, max_replica_faults=1)
        assert sum("replica" in f.target for f in faults) <= 1


def test_too_many_faults_for_the_steps_is_refused():
    with pytest.raises(ValueError, match="--faults 3 needs at least 5 --steps"):
        draw_faults(0, 4, 3, rollout_s=1.0, sync_s=0.1, max_replica_faults=1)


def _write_run(tmp_path, metrics: list[dict], faults: list[Fault], steps: int, errors=()):
    lines = [json.dumps({"step": i, "data": m}) for i, m in enumerate(metrics)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = {"steps": steps, "faults": [asdict(f) for f in faults], "errors": list(errors)}
    (tmp_path / RESULT_FILE).write_text(json.dumps(result))
    return tmp_path


def _step(reward: float, groups: int = 2, size: int = 4) -> dict:
    return {
        "reward/mean": reward,
        "reward/num_groups": groups,
        "reward/group_size_min": size,
        "reward/group_size_max": size,
    }


REFERENCE = [_step(0.25), _step(0.5), _step(0.75)]
DELIVERED = Fault("balancer", 1, 0.2, killed="load balancer (pid 7)", checkpoint="global_step_2")


def test_a_run_like_the_undisturbed_one_passes(tmp_path):
    assert check_run(_write_run(tmp_path, REFERENCE, [DELIVERED], 3), REFERENCE, 3) == []


@pytest.mark.parametrize(
    "metrics, faults, steps, expected",
    [
        (REFERENCE[:2], [DELIVERED], 2, "2 of 3 steps completed"),
        (
            [_step(0.25), _step(0.5, size=3), _step(0.75)],
            [DELIVERED],
            3,
            "step 2: reward/group_size_min 3 != undisturbed 4",
        ),
        (
            [_step(0.25), _step(0.5, groups=1), _step(0.75)],
            [DELIVERED],
            3,
            "step 2: reward/num_groups 1 != undisturbed 2",
        ),
        ([_step(0.25), _step(0.5), _step(0.7500001)], [DELIVERED], 3, "step 3: reward/mean 0.7500001 != undisturbed"),
        (REFERENCE, [Fault("worker", 1, 0.1)], 3, "fault not delivered"),
        (REFERENCE, [Fault("worker", 1, 0.1, killed="agent-loop worker 0 (pid 9)")], 3, "no checkpoint checked"),
    ],
)
def test_each_broken_invariant_is_reported(tmp_path, metrics, faults, steps, expected):
    problems = check_run(_write_run(tmp_path, metrics, faults, steps), REFERENCE, 3)
    assert any(expected in p for p in problems), problems


def test_a_watcher_error_is_reported(tmp_path):
    run = _write_run(tmp_path, REFERENCE, [DELIVERED], 3, errors=["watcher: RuntimeError: checkpoint unreadable"])
    assert check_run(run, REFERENCE, 3) == ["watcher: RuntimeError: checkpoint unreadable"]
