"""Leases: what lets a restarted OmniRequestLoadBalancer count again what its previous life placed (in-process).

A restart is Ray re-running ``__init__`` with the creation arguments: here, a second instance built from the same
arguments stands for the restarted actor (the Ray test is tests/integration/test_balancer_restart.py).
"""

from __future__ import annotations

import pytest

from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.request_routing import BalancerRestarted, OmniRequestLoadBalancer

SERVERS = {"s0": "handle-0", "s1": "handle-1"}


def _lb(policy: str = "prompt_uid_affinity") -> OmniRequestLoadBalancer:
    return OmniRequestLoadBalancer(servers=dict(SERVERS), routing=RolloutServerRoutingConfig(policy=policy))


def _ids(key: str, n: int) -> list[str]:
    return [f"{key}-{i}" for i in range(n)]


def _outstanding(lease: str, key: str, placement: list) -> tuple[str, str, list]:
    """What a client keeps of one acquire (and sends to restore_leases)."""
    return lease, key, [(sid, handle, len(copies)) for sid, handle, copies in placement]


def test_every_life_has_its_own_incarnation_and_a_stale_acquire_places_nothing():
    old, new = _lb(), _lb()
    assert old.incarnation != new.incarnation
    with pytest.raises(BalancerRestarted, match="restore_leases"):
        new.acquire_group(_ids("g", 4), routing_key="g", lease="L0", incarnation=old.incarnation)
    status = new.get_status()
    assert (status["total_inflight"], status["leases"], status["acquires"]) == (0, 0, 0)
    assert new.restore_leases([]) == new.incarnation  # asks the incarnation, restores nothing
    assert new.acquire_group(_ids("g", 4), routing_key="g", lease="L0", incarnation=new.incarnation)


def test_restored_leases_count_again_and_keep_their_pins():
    old = _lb()
    placed = {key: old.acquire_group(_ids(key, 4), routing_key=key, owner="w0", lease=f"L-{key}") for key in "abcd"}
    new = _lb()  # the restarted actor: nothing counted, nothing pinned
    assert new.get_total_inflight() == 0
    leases = [_outstanding(f"L-{key}", key, placement) for key, placement in placed.items()]
    assert new.restore_leases(leases, owner="w0") == new.incarnation
    assert new.get_status()["servers"] == old.get_status()["servers"]
    assert new.get_status()["held"] == {"w0": 16} and new.get_status()["restored"] == 16
    assert sum(new.get_status()["served"].values()) == 0  # served by the earlier life, not this one
    for key, ((sid, _, _),) in placed.items():  # a later copy of a key in flight joins its group
        ((again, _, _),) = new.acquire_group([f"{key}-late"], routing_key=key)
        assert again == sid
    new.restore_leases(leases, owner="w0")  # twice (two callers noticed the restart): counted once
    assert new.get_total_inflight() == 16 + 4


def test_a_release_the_restarted_balancer_does_not_know_is_ignored():
    """A release of a lease placed by the earlier life and not restored must not take load off newer requests."""
    old, new = _lb(), _lb()
    ((sid, _, copies),) = old.acquire_group(_ids("a", 4), routing_key="a", lease="L-old")
    ((sid_new, _, _),) = new.acquire_group(_ids("b", 4), routing_key="b", lease="L-new")
    assert new.release_group([(sid, len(copies))], lease="L-old") == new.incarnation
    assert new.get_status()["servers"][sid_new] == 4 and new.get_total_inflight() == 4
    new.release_group([(sid_new, 4)], lease="L-new")
    new.release_group([(sid_new, 4)], lease="L-new")  # released twice: the second is unknown
    assert new.get_total_inflight() == 0 and new.get_status()["leases"] == 0


def test_a_lease_releases_what_the_balancer_recorded():
    lb = _lb()
    ((sid, _, _),) = lb.acquire_group(_ids("a", 3), routing_key="a", owner="w0", lease="L0")
    lb.release_group([(sid, 3)], owner="w0", lease="L0")
    status = lb.get_status()
    assert (status["total_inflight"], status["held"], status["releases"]) == (0, {}, 3)


def test_restore_skips_removed_replicas_and_brings_back_ones_added_after_creation():
    old = _lb(policy="least_inflight")
    old.add_servers({"s2": "handle-2"})  # e.g. a replacement replica: not in the creation arguments
    new = _lb(policy="least_inflight")
    new.remove_servers(["s1"])  # dead
    leases = [("L0", None, [("s0", "handle-0", 1), ("s1", "handle-1", 2), ("s2", "handle-2", 3)])]
    new.restore_leases(leases)
    assert new.get_status()["servers"] == {"s0": 1, "s2": 3}
    assert sorted(new.get_all_servers()) == ["s0", "s2"]
    new.release_group([("s0", 1), ("s1", 2), ("s2", 3)], lease="L0")
    assert new.get_total_inflight() == 0
    new.add_servers({"s1": "handle-1b"})  # the slot refilled: an explicit add lifts the removal
    new.restore_leases([("L1", None, [("s1", "handle-1", 2)])])
    assert new.get_status()["servers"]["s1"] == 2


def test_release_owner_drops_the_owners_leases():
    lb = _lb()
    lb.acquire_group(_ids("a", 2), routing_key="a", owner="w0", lease="L0")
    lb.acquire_group(_ids("b", 2), routing_key="b", owner="w1", lease="L1")
    assert lb.release_owner("w0") == 2
    assert lb.get_status()["leases"] == 1
    lb.release_group([("s0", 2)], owner="w0", lease="L0")  # a late release of the dead owner's: already freed
    assert lb.get_total_inflight() == 2
