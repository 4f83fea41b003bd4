"""Routing decisions of OmniRequestLoadBalancer, in-process (the class is plain Python, like verl's)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from verl.workers.rollout.router import GlobalRequestLoadBalancer

from verl_omni.utils.seeding import stable_int
from verl_omni.workers.config.rollout_routing import RolloutServerRoutingConfig
from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer


def _servers(n: int) -> dict[str, str]:
    return {f"replica-{i}": f"handle-{i}" for i in range(n)}


def _lb(n: int = 2, max_cache_size: int = 10000, full_determinism: bool = False, **routing) -> OmniRequestLoadBalancer:
    return OmniRequestLoadBalancer(
        servers=_servers(n),
        max_cache_size=max_cache_size,
        full_determinism=full_determinism,
        routing=RolloutServerRoutingConfig(**routing),
    )


# ---------------------------------------------------------------- drop-in surface
def test_same_public_methods_and_argument_names_as_verl():
    import inspect

    for name, member in inspect.getmembers(GlobalRequestLoadBalancer, inspect.isfunction):
        if name.startswith("_") and name != "__init__":
            continue
        ours = getattr(OmniRequestLoadBalancer, name)
        # ray.remote() adds a `_ray_trace_ctx` parameter to a class it has wrapped: not part of the API.
        theirs_params = [p for p in inspect.signature(member).parameters if p != "_ray_trace_ctx"]
        ours_params = [p for p in inspect.signature(ours).parameters if p != "_ray_trace_ctx"]
        assert ours_params[: len(theirs_params)] == theirs_params, name


def test_status_has_verl_keys_and_extras():
    ours = _lb(3).get_status()
    theirs = GlobalRequestLoadBalancer(servers=_servers(3)).get_status()
    assert set(theirs) <= set(ours)
    assert ours["servers"] == theirs["servers"]
    for key in ("policy", "served", "pinned_keys", "diversions"):
        assert key in ours


def test_acquire_fields():
    lb = _lb()
    assert lb.require_acquire_fields() == ["routing_key"]
    assert lb.require_release_fields() == []


def test_empty_pool_error_message():
    lb = OmniRequestLoadBalancer(servers={})
    with pytest.raises(RuntimeError, match="No available servers in load balancer"):
        lb.acquire_server("r0")


def test_release_unknown_or_idle_is_ignored():
    lb = _lb()
    lb.release_server("replica-0")
    lb.release_server("nope")
    assert lb.get_total_inflight() == 0
    assert lb.get_inflight_count("replica-0") == 0


def test_invalid_policy_rejected_in_constructor():
    with pytest.raises(ValueError, match="policy='fastest'.*prompt_uid_affinity"):
        _lb(policy="fastest")
    with pytest.raises(ValueError, match="max_imbalance=-1"):
        _lb(policy="prompt_uid_affinity", max_imbalance=-1)
    with pytest.raises(ValueError, match="cache_size=0"):
        _lb(max_cache_size=0)


# ---------------------------------------------------------------- least_inflight (verl)
def test_least_inflight_matches_verl_decisions():
    """Same sequence of ops: our chosen server always has the minimum load, as verl's does, and
    sticky request ids return to their server."""
    ours, theirs = _lb(4), GlobalRequestLoadBalancer(servers=_servers(4))
    for lb in (ours, theirs):
        first = {f"r{i}": lb.acquire_server(f"r{i}")[0] for i in range(8)}
        assert sorted(Counter(first.values()).values()) == [2, 2, 2, 2]
        for rid, sid in first.items():
            assert lb.acquire_server(rid)[0] == sid  # sticky on request_id
        assert lb.get_total_inflight() == 16


def test_least_inflight_ignores_routing_key():
    lb = _lb(2)
    picked = {lb.acquire_server(f"r{i}", routing_key="same-group")[0] for i in range(4)}
    assert picked == {"replica-0", "replica-1"}


def test_least_inflight_tie_break_unbiased():
    counts = Counter()
    for _ in range(2000):
        lb = _lb(4)
        counts[lb.acquire_server("r")[0]] += 1
    assert all(400 < c < 600 for c in counts.values()), counts


def test_removed_server_invalidates_sticky_entry():
    lb = _lb(2)
    sid, _ = lb.acquire_server("r0")
    lb.remove_servers([sid])
    new_sid, handle = lb.acquire_server("r0")
    assert new_sid != sid and new_sid in lb.get_all_servers()
    assert handle == _servers(2)[new_sid]
    lb.release_server(sid)  # a release for the removed server is ignored
    assert lb.get_total_inflight() == 1


def test_clear_sticky_cache_reports_like_verl():
    lb = _lb(2)
    lb.acquire_server("a")
    lb.acquire_server("b")
    out = lb.clear_sticky_cache()
    assert out["cleared_entries"] == 2
    assert sum(out["server_loads"].values()) == 2
    assert lb.get_status()["pinned_keys"] == 0


def test_add_servers_extends_pool_and_new_server_gets_next_request():
    lb = _lb(2)
    lb.acquire_server("a")
    lb.acquire_server("b")
    lb.add_servers({"replica-9": "handle-9"})
    assert lb.acquire_server("c")[0] == "replica-9"
    assert lb.get_all_servers() == ["replica-0", "replica-1", "replica-9"]


# ---------------------------------------------------------------- prompt_uid_affinity
def test_affinity_colocates_groups_and_balances_new_keys():
    lb = _lb(2, policy="prompt_uid_affinity")
    where = {}
    for uid in ("u0", "u1", "u2", "u3"):
        for copy in range(8):
            sid, _ = lb.acquire_server(f"{uid}-{copy}", routing_key=uid)
            where.setdefault(uid, set()).add(sid)
    assert all(len(s) == 1 for s in where.values())  # every group on one replica
    served = lb.get_status()["served"]
    assert served == {"replica-0": 16, "replica-1": 16}  # new keys went to the least loaded
    assert lb.get_status()["pinned_keys"] == 4


def test_affinity_falls_back_to_request_id_for_missing_key():
    lb = _lb(2, policy="prompt_uid_affinity")
    for key in (None, ""):
        a = lb.acquire_server("req-1", routing_key=key)[0]
        assert lb.acquire_server("req-1", routing_key=key)[0] == a
    b = lb.acquire_server("req-2")[0]
    assert b != a  # req-2 is a new key: goes to the less-loaded replica


def test_affinity_strict_never_diverts():
    lb = _lb(2, policy="prompt_uid_affinity")
    sid = lb.acquire_server("r0", routing_key="hot")[0]
    for i in range(1, 50):
        assert lb.acquire_server(f"r{i}", routing_key="hot")[0] == sid
    assert lb.get_status()["diversions"] == 0


def test_soft_affinity_diverts_and_repins():
    lb = _lb(2, policy="prompt_uid_affinity", max_imbalance=2)
    sid = lb.acquire_server("r0", routing_key="hot")[0]
    other = next(s for s in lb.get_all_servers() if s != sid)
    # loads: pinned 1,2,3 vs 0 -> imbalance 3 > 2 on the 4th request
    assert lb.acquire_server("r1", routing_key="hot")[0] == sid
    assert lb.acquire_server("r2", routing_key="hot")[0] == sid
    assert lb.acquire_server("r3", routing_key="hot")[0] == other
    status = lb.get_status()
    assert status["diversions"] == 1
    assert lb.acquire_server("r4", routing_key="hot")[0] == other  # the key is re-pinned


def test_soft_affinity_keeps_pin_when_balanced():
    lb = _lb(2, policy="prompt_uid_affinity", max_imbalance=1)
    sid = lb.acquire_server("r0", routing_key="g")[0]
    lb.release_server(sid)
    for i in range(10):  # load never exceeds 1 above the minimum
        assert lb.acquire_server(f"r{i + 1}", routing_key="g")[0] == sid
        lb.release_server(sid)
    assert lb.get_status()["diversions"] == 0


def test_affinity_pin_to_removed_server_is_rerouted():
    lb = _lb(3, policy="prompt_uid_affinity")
    sid = lb.acquire_server("r0", routing_key="g")[0]
    lb.remove_servers([sid])
    new_sid = lb.acquire_server("r1", routing_key="g")[0]
    assert new_sid != sid
    assert lb.acquire_server("r2", routing_key="g")[0] == new_sid


# ---------------------------------------------------------------- prompt_hash_sharding
def test_hash_sharding_formula_and_independence_of_load():
    lb = _lb(4, policy="prompt_hash_sharding")
    ids = sorted(_servers(4))
    for i in range(40):
        key = f"uid-{i}"
        assert lb.acquire_server(f"r{i}", routing_key=key)[0] == ids[stable_int(key) % 4]
    assert lb.acquire_server("rid-x")[0] == ids[stable_int("rid-x") % 4]  # falls back to request_id


def test_hash_sharding_uses_sorted_ids_not_insertion_order():
    a = OmniRequestLoadBalancer(
        servers={"b": 1, "a": 2, "c": 3}, routing=RolloutServerRoutingConfig(policy="prompt_hash_sharding")
    )
    b = OmniRequestLoadBalancer(
        servers={"c": 3, "a": 2, "b": 1}, routing=RolloutServerRoutingConfig(policy="prompt_hash_sharding")
    )
    for i in range(30):
        assert a.acquire_server("r", routing_key=f"k{i}") == b.acquire_server("r", routing_key=f"k{i}")


def test_stable_int_identical_across_processes():
    keys = [f"uid-{i}" for i in range(5)] + ["", "ünïcode"]
    code = f"from verl_omni.utils.seeding import stable_int;print([stable_int(k) for k in {keys!r}])"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop() == str([stable_int(k) for k in keys])


# ---------------------------------------------------------------- round_robin
def test_round_robin_cycles_sorted_ids_regardless_of_load_and_key():
    lb = OmniRequestLoadBalancer(
        servers={"z": 0, "a": 1, "m": 2}, routing=RolloutServerRoutingConfig(policy="round_robin")
    )
    picks = [lb.acquire_server(f"r{i}", routing_key="same")[0] for i in range(7)]
    assert picks == ["a", "m", "z", "a", "m", "z", "a"]


def test_round_robin_after_pool_change():
    lb = OmniRequestLoadBalancer(servers={"a": 0, "b": 1}, routing=RolloutServerRoutingConfig(policy="round_robin"))
    assert lb.acquire_server("r0")[0] == "a"
    lb.add_servers({"c": 2})
    assert [lb.acquire_server(f"r{i}")[0] for i in range(3)] == ["b", "c", "a"]
    lb.remove_servers(["b"])
    picks = {lb.acquire_server(f"s{i}")[0] for i in range(4)}
    assert picks == {"a", "c"}


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize("policy", ["least_inflight", "prompt_uid_affinity", "prompt_hash_sharding", "round_robin"])
def test_counts_return_to_zero(policy):
    lb = _lb(3, policy=policy)
    acquired = [lb.acquire_server(f"r{i}", routing_key=f"g{i % 4}")[0] for i in range(24)]
    assert lb.get_total_inflight() == 24
    assert sum(lb.get_status()["served"].values()) == 24
    for sid in acquired:
        lb.release_server(sid)
    assert lb.get_total_inflight() == 0
    assert all(v == 0 for v in lb.get_status()["servers"].values())


# ---------------------------------------------------------------- groups placed at once
def _ids(group: str, n: int) -> list[str]:
    return [f"{group}-copy{i}" for i in range(n)]


def _one_by_one(lb: OmniRequestLoadBalancer, request_ids: list[str], key: str | None) -> dict[str, list[int]]:
    placement: dict[str, list[int]] = {}
    for i, rid in enumerate(request_ids):
        placement.setdefault(lb.acquire_server(rid, routing_key=key)[0], []).append(i)
    return placement


def test_group_placement_counts_every_copy_and_releases_in_one_call():
    lb = _lb(2, policy="prompt_uid_affinity")
    ((sid, handle, copies),) = lb.acquire_group(_ids("g0", 8), routing_key="g0")
    assert handle == f"handle-{sid[-1]}" and copies == list(range(8))
    assert lb.get_inflight_count(sid) == 8 and lb.get_total_inflight() == 8
    status = lb.get_status()
    assert status["acquires"] == 8 and status["acquire_calls"] == 1 and status["served"][sid] == 8
    # the next group sees the first one's full weight: least loaded is the other replica
    ((other, _, _),) = lb.acquire_group(_ids("g1", 8), routing_key="g1")
    assert other != sid
    # a late copy of g0 acquired alone still follows its group's pin
    assert lb.acquire_server("g0-late", routing_key="g0")[0] == sid
    lb.release_group([(sid, 8), (other, 8)])
    lb.release_server(sid)
    status = lb.get_status()
    assert status["total_inflight"] == 0
    assert status["releases"] == status["acquires"] == 17
    assert (status["acquire_calls"], status["release_calls"]) == (3, 2)


@pytest.mark.parametrize(
    ("policy", "extra"),
    [
        ("least_inflight", {}),
        ("round_robin", {}),
        ("prompt_hash_sharding", {}),
        ("prompt_uid_affinity", {}),
        ("prompt_uid_affinity", {"max_imbalance": 2}),
    ],
)
def test_group_placement_equals_acquiring_copies_one_by_one(policy, extra):
    """The contract: a group placed in one call lands where its copies, acquired one after another, would."""
    grouped = _lb(3, policy=policy, full_determinism=True, **extra)
    single = _lb(3, policy=policy, full_determinism=True, **extra)
    for g, n in enumerate([5, 3, 8, 1, 4, 6]):
        key = f"g{g % 4}"  # keys come back: affinity pins and (soft) diverts
        ids = _ids(f"s{g}", n)
        placed = {sid: copies for sid, _, copies in grouped.acquire_group(ids, routing_key=key)}
        if policy == "prompt_uid_affinity" and extra:
            # soft affinity judges the pin once per group (loads before it) and never splits the group
            assert len(placed) == 1 and sum(map(len, placed.values())) == n
        else:
            assert placed == _one_by_one(single, ids, key)
    assert grouped.get_total_inflight() == sum([5, 3, 8, 1, 4, 6])


def test_least_inflight_and_round_robin_split_groups_strict_affinity_does_not():
    for policy, parts in (
        ("least_inflight", 4),
        ("round_robin", 4),
        ("prompt_uid_affinity", 1),
        ("prompt_hash_sharding", 1),
    ):
        lb = _lb(4, policy=policy)
        placement = lb.acquire_group(_ids("g", 8), routing_key="g")
        assert len(placement) == parts, policy
        assert sorted(i for _, _, copies in placement for i in copies) == list(range(8))
        assert lb.get_status()["split_groups"] == (parts > 1)


def test_soft_affinity_two_thresholds_gate_a_group():
    """Divert only when the pinned replica is above the least loaded by more than max_imbalance AND by more than
    max_imbalance_ratio times; a diverted group goes whole to the least loaded and the key is re-pinned there."""
    lb = _lb(2, policy="prompt_uid_affinity", max_imbalance=2, max_imbalance_ratio=2.0)
    ((pinned, _, _),) = lb.acquire_group(_ids("a", 6), routing_key="hot")  # new key: whole group, least loaded
    other = next(s for s in lb.get_all_servers() if s != pinned)
    lb.acquire_group(_ids("b", 4), routing_key="cold")  # loads: pinned 6, other 4
    # 6 - 4 = 2 is not above 2: stays
    ((sid, _, _),) = lb.acquire_group(_ids("c", 1), routing_key="hot")
    assert sid == pinned and lb.get_status()["diversions"] == 0
    lb.acquire_group(_ids("d", 1), routing_key="cold")  # loads 7 / 5: 7 - 5 = 2, still not above
    lb.release_group([(other, 3)])  # loads 7 / 2: above both thresholds (7 - 2 > 2 and 7 > 2 * 2)
    placement = lb.acquire_group(_ids("e", 4), routing_key="hot")
    assert lb.get_status()["diversions"] == 1
    assert [(sid, copies) for sid, _, copies in placement] == [(other, [0, 1, 2, 3])]  # whole, to the least loaded
    assert lb.acquire_server("late", routing_key="hot")[0] == other  # ... and the key follows it


def test_soft_affinity_relative_threshold_holds_the_pin_under_high_load():
    """At high load an absolute gap is small relative to the load: the ratio keeps the group on its replica."""
    lb = _lb(2, policy="prompt_uid_affinity", max_imbalance=2, max_imbalance_ratio=1.5)
    ((pinned, _, _),) = lb.acquire_group(_ids("a", 30), routing_key="hot")
    lb.acquire_group(_ids("b", 25), routing_key="cold")  # 30 - 25 > 2, but 30 < 1.5 * 25
    ((sid, _, _),) = lb.acquire_group(_ids("c", 2), routing_key="hot")
    assert sid == pinned and lb.get_status()["diversions"] == 0


def test_new_keys_break_ties_at_random_among_least_loaded():
    firsts = Counter()
    for trial in range(200):
        lb = _lb(4, policy="prompt_uid_affinity")
        firsts[lb.acquire_group(_ids(f"t{trial}", 8), routing_key=f"k{trial}")[0][0]] += 1
    assert set(firsts) == {f"replica-{i}" for i in range(4)}  # verl <= 0.9.1 always takes the first candidate
    assert min(firsts.values()) > 20


def test_release_count_never_goes_below_zero():
    lb = _lb(2)
    ((sid, _, _), *_) = lb.acquire_group(["r0", "r1"])
    lb.release_group([(sid, 5)])
    assert lb.get_inflight_count(sid) == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_release_count_is_rejected_before_counting(bad):
    lb = _lb(2)
    lb.acquire_group(["r0"])
    with pytest.raises(ValueError, match=r"count=.* must be a positive integer"):
        lb.release_group([("replica-0", bad)])
    assert lb.get_total_inflight() == 1


def test_empty_group_is_refused():
    with pytest.raises(ValueError, match="at least one request id"):
        _lb(2).acquire_group([])


def test_placement_for_a_removed_replica_never_raises():
    """A release or re-placement that names a replica removed meanwhile is ignored, never a KeyError."""
    lb = _lb(2, policy="prompt_uid_affinity")
    ((sid, _, _),) = lb.acquire_group(_ids("g", 4), routing_key="g")
    lb.remove_servers([sid])
    lb.release_group([(sid, 4)])
    ((new, _, _),) = lb.acquire_group(_ids("g", 4), routing_key="g")
    assert new != sid and lb.get_total_inflight() == 4


def test_servers_registered_with_none_handles_are_removed_and_readded():
    """verl's own tests register ``None`` handles: removal must not depend on the handle's truth value."""
    lb = OmniRequestLoadBalancer(servers={"s0": None, "s1": None})
    lb.remove_servers(["s1"])
    assert "s1" not in lb.get_status()["servers"] and lb.get_all_servers() == ["s0"]
    assert lb.acquire_server(request_id="r1")[0] == "s0"
    lb.add_servers({"s1": None})
    assert sorted(lb.get_all_servers()) == ["s0", "s1"]
    lb.remove_servers(["s0", "s1", "s1"])  # unknown / repeated ids are ignored
    with pytest.raises(RuntimeError, match="No available servers"):
        lb.acquire_server(request_id="r2")


def test_release_owner_frees_what_a_dead_worker_held():
    """A worker that dies mid-request never releases: its restarted incarnation frees it by owner name."""
    lb = _lb(2, policy="prompt_uid_affinity")
    ((held, _, _),) = lb.acquire_group(_ids("a", 4), routing_key="a", owner="worker-0")
    ((other, _, _),) = lb.acquire_group(_ids("b", 3), routing_key="b", owner="worker-1")
    lb.acquire_group(_ids("c", 2), routing_key="c", owner="worker-0")
    placement = lb.acquire_group(_ids("d", 1), routing_key="d", owner="worker-0")
    lb.release_group([(sid, len(copies)) for sid, _, copies in placement], owner="worker-0")
    assert lb.release_owner("worker-0") == 6  # groups a and c: still in flight when it died
    assert lb.get_status()["servers"] == {held: 0, other: 3}
    assert lb.get_total_inflight() == 3  # worker-1's group is untouched
    assert lb.release_owner("worker-0") == 0 and lb.release_owner("never-seen") == 0
