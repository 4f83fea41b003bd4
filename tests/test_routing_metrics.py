"""The routing metrics a user reads in the tracker: each must mean what its name says."""

from __future__ import annotations

import math

import pytest

from verl_omni.agent_loop.routing_metrics import colocation_rate, routing_metrics


def test_colocation_counts_groups_whose_samples_all_ran_on_one_replica():
    assert colocation_rate(["a", "a", "b", "b"], ["r0", "r0", "r0", "r1"]) == 0.5
    assert colocation_rate([], []) == 0.0


def test_idle_registered_replica_counts_and_the_ratio_stays_finite():
    m = routing_metrics(["a", "a", "b", "b"], ["r0", "r0", "r0", "r0"], all_servers=["r0", "r1"])
    assert m["rollout_routing/replicas_used"] == 1.0
    assert (m["rollout_routing/load_max"], m["rollout_routing/load_min"]) == (4.0, 0.0)
    assert m["rollout_routing/load_max_min_ratio"] == 4.0 and math.isfinite(m["rollout_routing/load_max_min_ratio"])
    assert m["rollout_routing/requests/r1"] == 0.0 and m["rollout_routing/num_groups"] == 2.0


def test_measured_replica_speeds_give_the_slowest_fastest_and_their_ratio():
    m = routing_metrics(["a"], ["r0"], seconds_per_request={"r0": 0.2, "r1": 0.5, "r2": None})
    assert m["rollout_routing/seconds_per_request_max"] == 0.5
    assert m["rollout_routing/seconds_per_request_min"] == 0.2
    assert m["rollout_routing/replica_slowdown_max"] == pytest.approx(2.5)


@pytest.mark.parametrize("costs", [None, {}, {"r0": None}])
def test_no_speed_metrics_without_measurements(costs):
    m = routing_metrics(["a"], ["r0"], seconds_per_request=costs, resent=0, diversions=3)
    assert not [k for k in m if "seconds_per_request" in k or "slowdown" in k]
    assert m["rollout_routing/requests_resent"] == 0.0 and m["rollout_routing/diversions"] == 3.0
