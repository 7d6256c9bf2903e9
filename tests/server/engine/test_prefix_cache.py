"""PrefixCache: a bounded LRU of per-task prefix keys and values, with exact counters."""

import torch

from server.engine.prefix_cache import PrefixCache


def key(task: str, version: int = 1) -> tuple[str, int, str]:
    return (task, version, f"digest-{task}-{version}")


def kv(fill: float):
    """One layer's keys and values [kv_heads, length, head_dim]."""
    return [(torch.full((2, 3, 4), fill), torch.full((2, 3, 4), -fill))]


def test_a_hit_gives_back_what_was_put_and_counts():
    cache = PrefixCache(2)
    a = kv(1.0)
    cache.put(key("a"), a)
    assert cache.get(key("a")) is a
    assert cache.get(key("b")) is None
    assert cache.stats() == {"size": 1, "capacity": 2, "hits": 1, "misses": 1, "evictions": 0}


def test_the_least_recently_used_entry_is_evicted_first():
    cache = PrefixCache(2)
    a, c = kv(1.0), kv(3.0)
    cache.put(key("a"), a)
    cache.put(key("b"), kv(2.0))
    assert cache.get(key("a")) is a  # a is now the most recent: b goes first
    cache.put(key("c"), c)
    assert cache.get(key("b")) is None
    assert cache.get(key("a")) is a and cache.get(key("c")) is c
    cache.put(key("d"), kv(4.0))  # a was read before c: a goes
    assert cache.get(key("a")) is None
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 3, "misses": 2, "evictions": 2}


def test_putting_a_key_again_replaces_its_entry_and_makes_it_recent():
    cache = PrefixCache(2)
    cache.put(key("a"), kv(1.0))
    cache.put(key("b"), kv(2.0))
    newer = kv(5.0)
    cache.put(key("a"), newer)
    cache.put(key("c"), kv(3.0))  # b is the oldest now
    assert cache.get(key("a")) is newer and cache.get(key("b")) is None
    assert cache.stats() == {"size": 2, "capacity": 2, "hits": 1, "misses": 1, "evictions": 1}


def test_each_version_and_digest_is_its_own_entry():
    """A new upload (or a store that restarted its counters) never meets an old prefix."""
    cache = PrefixCache(4)
    old = kv(1.0)
    cache.put(("t", 1, "d1"), old)
    assert cache.get(("t", 2, "d1")) is None
    assert cache.get(("t", 1, "d2")) is None
    assert cache.get(("t", 1, "d1")) is old
    assert cache.stats() == {"size": 1, "capacity": 4, "hits": 1, "misses": 2, "evictions": 0}


def test_capacity_zero_stores_nothing():
    cache = PrefixCache(0)
    cache.put(key("a"), kv(1.0))
    assert cache.get(key("a")) is None
    assert cache.stats() == {"size": 0, "capacity": 0, "hits": 0, "misses": 1, "evictions": 0}


def test_clear_empties_the_cache_and_keeps_the_counters():
    cache = PrefixCache(2)
    stored = kv(1.0)
    cache.put(key("a"), stored)
    assert cache.get(key("a")) is stored
    cache.clear()
    assert cache.get(key("a")) is None
    assert cache.stats() == {"size": 0, "capacity": 2, "hits": 1, "misses": 1, "evictions": 0}
