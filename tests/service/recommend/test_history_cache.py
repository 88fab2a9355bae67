"""The per-user history-embedding cache: hits only on the same prompt, bounded, and deletion-safe."""

import numpy as np

from apa.hashing import hmac_hex
from service.history_cache import HistoryCache


def test_hits_only_while_the_prompt_is_unchanged() -> None:
    cache = HistoryCache(max_entries=8)
    cache.put("u1", "liked A", np.ones(3), cache.epoch)
    hit = cache.get("u1", "liked A")
    assert hit is not None and hit.tolist() == [1.0, 1.0, 1.0]
    assert cache.get("u1", "liked A, B") is None
    assert cache.get("u2", "liked A") is None


def test_keeps_the_most_recently_used_users() -> None:
    cache = HistoryCache(max_entries=2)
    for user in ("u1", "u2"):
        cache.put(user, user, np.zeros(1), cache.epoch)
    assert cache.get("u1", "u1") is not None  # u1 is now the most recent
    cache.put("u3", "u3", np.zeros(1), cache.epoch)
    assert len(cache) == 2
    assert cache.get("u2", "u2") is None and cache.get("u1", "u1") is not None


def test_forget_drops_entries_and_refuses_stale_puts() -> None:
    cache = HistoryCache(max_entries=8)
    cache.put("u1", "p", np.zeros(1), cache.epoch)
    cache.put("u2", "p", np.zeros(1), cache.epoch)
    read_at = cache.epoch  # a request read u1's history here...
    cache.forget("u1")  # ...then u1 deleted data
    assert cache.get("u1", "p") is None and cache.get("u2", "p") is not None
    cache.put("u1", "p", np.zeros(1), read_at)
    assert cache.get("u1", "p") is None, "an embedding of a history read before the deletion is not stored"
    read_at = cache.epoch
    cache.forget_subjects({hmac_hex(b"k", "user", "u2")}, b"k")  # u2's deletion completed
    assert len(cache) == 0
    cache.put("u2", "p", np.zeros(1), read_at)
    assert len(cache) == 0


def test_size_zero_disables_it() -> None:
    cache = HistoryCache(max_entries=0)
    cache.put("u1", "p", np.zeros(1), cache.epoch)
    assert cache.get("u1", "p") is None
