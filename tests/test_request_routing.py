"""Routing decisions of OmniRequestLoadBalancer, in-process (the class is plain Python, like verl's)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from verl.workers.rollout.router import GlobalRequestLoadBalancer

from verl_omni.workers.rollout.request_routing import OmniRequestLoadBalancer, stable_hash


def _servers(n: int) -> dict[str, str]:
    return {f"replica-{i}": f"handle-{i}" for i in range(n)}


def _lb(n: int = 2, **kw) -> OmniRequestLoadBalancer:
    return OmniRequestLoadBalancer(servers=_servers(n), **kw)


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
    with pytest.raises(ValueError, match="max_imbalance=0"):
        _lb(policy="prompt_uid_affinity", max_imbalance=0)
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
        assert lb.acquire_server(f"r{i}", routing_key=key)[0] == ids[stable_hash(key) % 4]
    assert lb.acquire_server("rid-x")[0] == ids[stable_hash("rid-x") % 4]  # falls back to request_id


def test_hash_sharding_uses_sorted_ids_not_insertion_order():
    a = OmniRequestLoadBalancer(servers={"b": 1, "a": 2, "c": 3}, policy="prompt_hash_sharding")
    b = OmniRequestLoadBalancer(servers={"c": 3, "a": 2, "b": 1}, policy="prompt_hash_sharding")
    for i in range(30):
        assert a.acquire_server("r", routing_key=f"k{i}") == b.acquire_server("r", routing_key=f"k{i}")


def test_stable_hash_identical_across_processes():
    keys = [f"uid-{i}" for i in range(5)] + ["", "ünïcode"]
    code = (
        f"from verl_omni.workers.rollout.request_routing import stable_hash;print([stable_hash(k) for k in {keys!r}])"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop() == str([stable_hash(k) for k in keys])


# ---------------------------------------------------------------- round_robin
def test_round_robin_cycles_sorted_ids_regardless_of_load_and_key():
    lb = OmniRequestLoadBalancer(servers={"z": 0, "a": 1, "m": 2}, policy="round_robin")
    picks = [lb.acquire_server(f"r{i}", routing_key="same")[0] for i in range(7)]
    assert picks == ["a", "m", "z", "a", "m", "z", "a"]


def test_round_robin_after_pool_change():
    lb = OmniRequestLoadBalancer(servers={"a": 0, "b": 1}, policy="round_robin")
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


# ---------------------------------------------------------------- groups acquired at once
def test_group_acquire_counts_every_request_in_flight():
    lb = _lb(2, policy="prompt_uid_affinity")
    sid, handle = lb.acquire_server("g0-copy0", routing_key="g0", count=8)
    assert handle == f"handle-{sid[-1]}"
    assert lb.get_inflight_count(sid) == 8 and lb.get_total_inflight() == 8
    status = lb.get_status()
    assert status["acquires"] == 8 and status["acquire_calls"] == 1 and status["served"][sid] == 8
    # the next group sees the first one's full weight: least loaded is the other replica
    other, _ = lb.acquire_server("g1-copy0", routing_key="g1", count=8)
    assert other != sid
    # a single copy of g0 acquired alone still follows its group's pin
    assert lb.acquire_server("g0-late", routing_key="g0")[0] == sid
    lb.release_server(sid, count=8)
    lb.release_server(sid)
    lb.release_server(other, "g1-copy0", count=8)
    status = lb.get_status()
    assert status["total_inflight"] == 0
    assert status["releases"] == status["acquires"] == 17
    assert (status["acquire_calls"], status["release_calls"]) == (3, 3)


def test_group_weight_steers_least_inflight_and_soft_affinity():
    lb = _lb(2, policy="least_inflight")
    heavy, _ = lb.acquire_server("r0", count=5)
    picks = [lb.acquire_server(f"r{i}")[0] for i in range(1, 5)]
    assert heavy not in picks  # 4 singles go to the other replica until the loads meet
    soft = _lb(2, policy="prompt_uid_affinity", max_imbalance=2)
    pinned, _ = soft.acquire_server("g0-0", routing_key="g0", count=3)
    assert soft.acquire_server("g0-1", routing_key="g0")[0] != pinned  # 3 above the idle replica: diverted
    assert soft.get_status()["diversions"] == 1


def test_release_count_never_goes_below_zero():
    lb = _lb(2)
    sid, _ = lb.acquire_server("r", count=2)
    lb.release_server(sid, count=5)
    assert lb.get_inflight_count(sid) == 0 and lb.get_status()["releases"] == 2


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_count_is_rejected_before_counting(bad):
    lb = _lb(2)
    with pytest.raises(ValueError, match=r"count=.* must be a positive integer"):
        lb.acquire_server("r", count=bad)
    with pytest.raises(ValueError, match=r"count=.* must be a positive integer"):
        lb.release_server("replica-0", count=bad)
    assert lb.get_total_inflight() == 0 and lb.get_status()["acquire_calls"] == 0


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
