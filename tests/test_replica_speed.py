"""Per-replica seconds per request as the balancer measures them, with a clock the test moves by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.replica_speed import ReplicaSpeeds
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _speeds(*ids: str, window: int = 256) -> tuple[ReplicaSpeeds, dict[str, int], Clock]:
    counts: dict[str, int] = {}
    clock = Clock()
    speeds = ReplicaSpeeds(lambda sid: counts.get(sid, 0), clock, window=window)
    for sid in ids:
        counts[sid] = 0
        speeds.add(sid)
    return speeds, counts, clock


def _run(speeds: ReplicaSpeeds, counts: dict[str, int], clock: Clock, sid: str, k: int, seconds: float) -> None:
    """``k`` requests in flight on ``sid`` for ``seconds``, then released."""
    counts[sid] += k
    speeds.changed(sid, counts[sid] - k, counts[sid])
    clock.now += seconds
    counts[sid] -= k
    speeds.changed(sid, counts[sid] + k, counts[sid])


def test_cost_is_busy_time_per_released_request_and_waits_for_every_replica():
    speeds, counts, clock = _speeds("a", "b")
    _run(speeds, counts, clock, "a", 4, 1.0)
    assert speeds.cost("a") == pytest.approx(0.25) and speeds.cost("b") is None
    assert not speeds.active  # b unmeasured: comparing with a guess is worse than plain counts
    clock.now += 5.0  # idle time counts for nobody
    _run(speeds, counts, clock, "b", 4, 2.0)
    assert speeds.cost("b") == pytest.approx(0.5) and speeds.active
    assert speeds.pick() == "a"  # both idle: a finishes one more request first
    counts["a"] = 4  # 5 x 0.25 = 1.25 > 1 x 0.5
    speeds.changed("a", 0, 4)
    assert speeds.pick() == "b"
    assert speeds.load("a") == pytest.approx(4 * 0.25 / 0.375)  # requests at the mean speed


def test_overlapping_requests_share_the_busy_time():
    speeds, counts, clock = _speeds("a")
    counts["a"] = 2
    speeds.changed("a", 0, 2)
    clock.now = 1.0
    counts["a"] = 6  # four more while busy: the span is not restarted
    speeds.changed("a", 2, 6)
    clock.now = 3.0
    counts["a"] = 0
    speeds.changed("a", 6, 0)
    assert speeds.cost("a") == pytest.approx(3.0 / 6)


def test_recent_work_dominates_past_the_window():
    speeds, counts, clock = _speeds("a", window=16)
    for _ in range(8):
        _run(speeds, counts, clock, "a", 4, 0.4)  # 0.1 s per request
    for _ in range(16):
        _run(speeds, counts, clock, "a", 4, 1.2)  # then 0.3 s per request
    assert speeds.cost("a") == pytest.approx(0.3, rel=0.05)


def test_unreleased_requests_of_a_dead_worker_do_not_time_the_replica():
    speeds, counts, clock = _speeds("a")
    _run(speeds, counts, clock, "a", 4, 1.0)
    counts["a"] = 4
    speeds.changed("a", 0, 4)
    clock.now += 100.0
    counts["a"] = 0
    speeds.changed("a", 4, 0, completed=False)
    assert speeds.cost("a") == pytest.approx(0.25)


def test_added_replica_starts_at_the_mean_and_removed_one_is_never_picked():
    speeds, counts, clock = _speeds("a", "b")
    _run(speeds, counts, clock, "a", 1, 1.0)
    _run(speeds, counts, clock, "b", 1, 3.0)
    counts["c"] = 0
    speeds.add("c")
    assert speeds.cost("c") == pytest.approx(2.0)
    speeds.remove("a")
    assert {speeds.pick() for _ in range(10)} == {"c"}
    assert speeds.as_dict() == {"b": pytest.approx(3.0), "c": pytest.approx(2.0)}


def test_ties_are_broken_at_random():
    speeds, counts, clock = _speeds(*"abcd")
    for sid in "abcd":
        _run(speeds, counts, clock, sid, 2, 1.0)
    picks = Counter()
    for _ in range(200):
        speeds.changed("a", 0, 0)  # re-push: every replica ties at (0 + 1) x 0.5
        speeds._rebuild()
        picks[speeds.pick()] += 1
    assert set(picks) == set("abcd")


# ------------------------------------------------------------------ in the balancer
def _balancer(n: int, clock: Clock, **routing) -> OmniRequestLoadBalancer:
    return OmniRequestLoadBalancer(
        servers={f"r{i}": None for i in range(n)},
        routing=RolloutServerRoutingConfig(**routing),
        clock=clock,
        seed=0,
    )


def _measure(lb: OmniRequestLoadBalancer, clock: Clock, seconds: dict[str, float]) -> None:
    """One group of 4 on each idle replica (counts spread them one per replica), each released after
    ``seconds[replica]``: the first measurement of every replica."""
    placements = [lb.acquire_group([f"m{g}-{c}" for c in range(4)], routing_key=f"m{g}") for g in range(len(seconds))]
    assert sorted(p[0][0] for p in placements) == sorted(seconds)
    start = clock.now
    for placement in sorted(placements, key=lambda p: seconds[p[0][0]]):
        clock.now = start + seconds[placement[0][0]]
        lb.release_group([(sid, len(copies)) for sid, _, copies in placement])


def test_speed_aware_affinity_gives_a_half_speed_replica_half_the_groups():
    clock = Clock()
    lb = _balancer(4, clock, policy="prompt_uid_affinity", speed_aware=True)
    _measure(lb, clock, {"r0": 2.0, "r1": 1.0, "r2": 1.0, "r3": 1.0})
    status = lb.get_status()
    assert status["speed_aware"] and status["seconds_per_request"]["r0"] == pytest.approx(0.5)
    groups = Counter(lb.acquire_group([f"g{g}-{c}" for c in range(8)], routing_key=f"g{g}")[0][0] for g in range(28))
    assert groups == {"r0": 4, "r1": 8, "r2": 8, "r3": 8}  # every group whole, work even in time
    plain = _balancer(4, clock, policy="prompt_uid_affinity")
    _measure(plain, clock, {"r0": 2.0, "r1": 1.0, "r2": 1.0, "r3": 1.0})
    counted = Counter(
        plain.acquire_group([f"g{g}-{c}" for c in range(8)], routing_key=f"g{g}")[0][0] for g in range(28)
    )
    assert counted == {"r0": 7, "r1": 7, "r2": 7, "r3": 7}


def test_speed_aware_gate_diverts_a_pin_on_the_slow_replica():
    clock = Clock()
    lb = _balancer(2, clock, policy="prompt_uid_affinity", speed_aware=True, max_imbalance=8, max_imbalance_ratio=1.5)
    _measure(lb, clock, {"r0": 3.0, "r1": 1.0})  # r0 three times slower
    ((pin, _, _),) = lb.acquire_group([f"a-{c}" for c in range(8)], routing_key="a")
    assert pin == "r1"  # a new key goes where it finishes first
    lb.release_group([("r1", 8)])
    lb._sticky.put("slow", "r0")  # a key pinned while r0 was fast
    lb.acquire_group(["x-0", "x-1", "x-2", "x-3", "x-4", "x-5", "x-6", "x-7"], routing_key="slow")  # r0: 8 in flight
    # r0 holds 8 x 1.5 = 12 requests at the mean speed, r1 none: 12 - 0 > 8 and 12 > 1.5 x 0 -> diverted
    ((where, _, _),) = lb.acquire_group([f"y-{c}" for c in range(8)], routing_key="slow")
    assert where == "r1" and lb.get_status()["diversions"] == 1


def test_count_based_balancer_reports_no_speeds():
    status = _balancer(2, Clock(), policy="prompt_uid_affinity").get_status()
    assert status["speed_aware"] is False and status["seconds_per_request"] == {}


def test_speed_aware_least_inflight_sends_new_request_ids_to_the_faster_replica():
    clock = Clock()
    lb = _balancer(2, clock, policy="least_inflight", speed_aware=True)
    first, _ = lb.acquire_server("m-0")  # verl's per-request path: one request on each idle replica
    second, _ = lb.acquire_server("m-1")
    assert {first, second} == {"r0", "r1"}
    for sid in ("r1", "r0"):
        clock.now = {"r0": 4.0, "r1": 1.0}[sid]
        lb.release_server(sid)
    placement = lb.acquire_group([f"z-{c}" for c in range(10)])
    assert {sid: len(c) for sid, _, c in placement} == {"r0": 2, "r1": 8}  # (2+1) x 4 >= (8+1) x 1
