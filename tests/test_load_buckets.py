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
            buckets.increment(sid)
            model[sid] += 1
        else:
            sid = rng.choice(sorted(model))
            changed = buckets.decrement(sid)
            assert changed == (model[sid] > 0)
            model[sid] = max(0, model[sid] - 1)
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
