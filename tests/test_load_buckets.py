"""LoadBuckets must agree with a brute-force model under any sequence of operations."""

import random
from collections import Counter

import pytest

from verl_omni.workers.rollout.load_buckets import LoadBuckets


def test_matches_brute_force_under_random_ops():
    rng = random.Random(0)
    buckets = LoadBuckets(rng=random.Random(1))
    model: dict[str, int] = {}
    next_id = 0
    for _ in range(20000):
        op = rng.random()
        if op < 0.05 or not model:
            sid = f"s{next_id}"
            next_id += 1
            buckets.add(sid)
            model[sid] = 0
        elif op < 0.08 and len(model) > 1:
            sid = rng.choice(sorted(model))
            buckets.remove(sid)
            del model[sid]
        elif op < 0.55:
            sid = buckets.pick_least_loaded()
            assert model[sid] == min(model.values())
            k = 1 if rng.random() < 0.7 else rng.randint(2, 9)  # a group acquired at once
            buckets.increment(sid, k)
            model[sid] += k
        else:
            sid = rng.choice(sorted(model))
            k = 1 if rng.random() < 0.7 else rng.randint(2, 9)
            changed = buckets.decrement(sid, k)
            assert changed == min(k, model[sid])
            model[sid] = max(0, model[sid] - k)
        assert buckets.min_count == min(model.values())
        assert buckets.total == sum(model.values())
        assert buckets.as_dict() == model


def test_tie_breaking_is_uniform():
    buckets = LoadBuckets(rng=random.Random(7))
    for i in range(4):
        buckets.add(f"s{i}")
    picks = Counter(buckets.pick_least_loaded() for _ in range(8000))
    assert set(picks) == {"s0", "s1", "s2", "s3"}
    assert all(1700 < c < 2300 for c in picks.values()), picks


def test_idle_and_unknown_decrement_ignored():
    buckets = LoadBuckets()
    buckets.add("a")
    assert not buckets.decrement("a")
    assert not buckets.decrement("missing")
    assert buckets.count("a") == 0 and buckets.total == 0


def test_empty_pool_raises_verl_message():
    with pytest.raises(RuntimeError, match="No available servers in load balancer"):
        LoadBuckets().pick_least_loaded()


def test_group_moves_keep_the_minimum_right():
    buckets = LoadBuckets()
    for sid in ("a", "b"):
        buckets.add(sid)
    buckets.increment("a", 8)
    assert buckets.min_count == 0 and buckets.pick_least_loaded() == "b"
    buckets.increment("b", 5)  # the minimum jumps over the empty counts 1..4
    assert buckets.min_count == 5 and buckets.pick_least_loaded() == "b"
    assert buckets.decrement("a", 8) == 8 and buckets.min_count == 0
    assert buckets.decrement("b", 9) == 5  # never below zero
    assert buckets.total == 0 and buckets.as_dict() == {"a": 0, "b": 0}
