"""make chaos: the faults a seed draws and the checks each run must pass (the runs themselves: ``make chaos``)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from dataclasses import asdict

import pytest

from recipes.flowgrpo.chaos import RESULT_FILE, TARGETS, Fault, Watcher, check_run, draw_faults


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


class _Trainer:
    """What the watcher reads of the trainer (its phase, history, checkpoints, save_freq): a double, so the watcher
    is tested without a recipe run. Each step's phase lasts until the process the watcher was to kill in it is dead."""

    def __init__(self, tmp_path):
        from omegaconf import OmegaConf

        from verl_omni.utils.heartbeat import Heartbeat

        self.heartbeat = Heartbeat(0)
        self.history: list[dict] = []
        self.ckpt_dir = tmp_path / "checkpoints"
        self.config = OmegaConf.create({"trainer": {"save_freq": 2}})

    def fit(self, steps: int, victims: dict[tuple[int, str], subprocess.Popen]) -> None:
        from verl_omni.utils.checkpoint import save_checkpoint

        for step in range(steps):
            for phase in ("rollout of 8 samples", "weight sync"):
                with self.heartbeat.phase(f"step {step + 1}: {phase}"):
                    victim = victims.get((step, phase.split(" of ")[0]))
                    if victim is not None:
                        victim.wait(timeout=120)
            self.history.append({"step": step})
            if (step + 1) % 2 == 0:
                save_checkpoint(self.ckpt_dir, step + 1, {"actor": {"w": 1}, "trainer": {"step": step + 1}})


def test_the_watcher_kills_in_consecutive_steps_and_checks_each_checkpoint(tmp_path):
    """Faults in steps 2, 3 and 4 (the last in weight sync): each killed in its phase, each checkpoint loaded."""
    faults = [Fault("worker", 1, 0.0), Fault("balancer", 2, 0.0), Fault("replica_in_sync", 3, 0.0)]
    victims = {
        (f.step, "weight sync" if f.target == "replica_in_sync" else "rollout"): subprocess.Popen(["sleep", "120"])
        for f in faults
    }
    trainer = _Trainer(tmp_path)

    class LocalWatcher(Watcher):
        def _victim(self, fault):
            key = (fault.step, "weight sync" if fault.target == "replica_in_sync" else "rollout")
            return fault.target, victims[key].pid

    watcher = LocalWatcher(trainer, faults)
    thread = threading.Thread(target=watcher.run)
    thread.start()
    trainer.fit(6, victims)
    watcher.stop.set()
    thread.join()
    assert watcher.errors == []
    assert [v.returncode for v in victims.values()] == [-signal.SIGKILL] * 3
    assert [f.phase for f in faults] == [
        "step 2: rollout of 8 samples",
        "step 3: rollout of 8 samples",
        "step 4: weight sync",
    ]
    assert [f.checkpoint for f in faults] == ["global_step_2", "global_step_2", "global_step_4"]
