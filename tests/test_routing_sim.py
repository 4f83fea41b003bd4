"""The routing simulator drives the real balancer class: its bookkeeping must close on every scenario."""

from __future__ import annotations

import pytest

from benchmarks.routing_sim import CostModel, Simulation, routing_setups, scenarios

N = 4


@pytest.mark.parametrize("setup", sorted(routing_setups(N)))
@pytest.mark.parametrize("scenario", scenarios(replicas=4, n=N, steps=2), ids=lambda s: s.name)
def test_every_group_completes_and_every_acquire_is_released(setup, scenario):
    result = Simulation(scenario, routing_setups(N)[setup], replicas=4, max_num_seqs=8, cost=CostModel()).run()
    assert result.makespan_ms >= result.lower_bound_ms > 0  # a lower bound never exceeds a schedule
    if scenario.lose_replica_at_ms is None:
        assert result.resent == 0
        assert result.rpcs_per_sample == pytest.approx(2 / N)  # one acquire and one release per group
    else:
        assert result.resent > 0 and result.rpcs_per_sample > 2 / N
    if setup in (
        "prompt_uid_affinity",
        "prompt_hash_sharding",
        "affinity+gate",
        "affinity+speed",
        "affinity+gate+speed",
    ):
        assert result.colocation == 1.0  # keyed groups are never split, also when resent after a loss
        if scenario.lose_replica_at_ms is None:  # (the bound counts live replicas only)
            assert result.makespan_ms >= result.group_bound_ms  # no co-locating schedule beats the whole-group bound
    assert result.group_bound_ms >= result.lower_bound_ms


def test_group_colocation_saves_encodes_over_least_inflight():
    scenario = scenarios(replicas=4, n=N, steps=1)[0]
    setups = routing_setups(N)
    affinity, least = (
        Simulation(scenario, setups[name], replicas=4, max_num_seqs=8, cost=CostModel()).run()
        for name in ("prompt_uid_affinity", "least_inflight")
    )
    assert affinity.encode_hit_rate > least.encode_hit_rate


def test_speed_aware_affinity_gives_a_slow_replica_less_once_measured():
    """One half-speed replica of 4: after the first step (no measurement yet) speed-aware placement is within
    10% of the best whole-group schedule; counting requests stays about 1.5x off (the slow replica gets as many
    groups as the others)."""
    scenario = scenarios(replicas=4, n=8, steps=3)[1]
    assert scenario.slow_replicas == 1
    setups = routing_setups(8)
    speed, counted = (
        Simulation(scenario, setups[name], replicas=4, max_num_seqs=8, cost=CostModel()).run()
        for name in ("affinity+speed", "prompt_uid_affinity")
    )
    assert speed.colocation == counted.colocation == 1.0
    assert speed.warm_ratio < 1.1 < 1.4 < counted.warm_ratio
