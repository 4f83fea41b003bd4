from verl_omni.utils.lru import LRUMap


def test_evicts_least_recently_used():
    lru = LRUMap(maxsize=2)
    lru.put("a", "s0")
    lru.put("b", "s1")
    assert lru.get("a") == "s0"  # a is now most recent
    lru.put("c", "s2")  # evicts b
    assert "b" not in lru and lru.get("a") == "s0" and lru.get("c") == "s2"
    assert len(lru) == 2


def test_pop_and_clear():
    lru = LRUMap(maxsize=4)
    lru.put("a", "s0")
    lru.pop("a")
    lru.pop("missing")
    assert lru.get("a") is None
    lru.put("b", "s1")
    lru.clear()
    assert len(lru) == 0
