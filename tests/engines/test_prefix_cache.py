"""The prefix cache across calls (exact, dropped when stale) and the engines built by name."""

from pathlib import Path

import numpy as np
import pytest
import torch

from apa.engines.base import AdapterRef
from apa.engines.torch import TorchEngine
from apa.model import BaseModel
from tests.support.adapters import SHARED_TOL, K, refs


def test_prefix_cache_by_hand() -> None:
    from apa.engines.prefix_cache import PrefixCache, PrefixKey

    def key(i: int) -> PrefixKey:
        return PrefixKey(tokens=(i,), weights=(1.0, 0.0), mode="nd", versions=((0, 1), (1, 1)))

    states = [(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]  # 2 x 8 floats: 64 bytes
    cache = PrefixCache(capacity_bytes=150)
    cache.put(key(1), states, generation=0)
    cache.put(key(2), states, generation=0)
    assert cache.get(key(1)) is states  # 1 is now the most recent
    cache.put(key(3), states, generation=0)  # 192 bytes > 150: the least recently used (2) goes
    assert cache.get(key(2)) is None and cache.get(key(3)) is states
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 1, 2, 128)
    assert cache.drop(lambda k: k.tokens == (1,)) == 1 and len(cache) == 1
    cache.put(key(4), states, generation=0)  # computed before that drop: refused
    assert cache.get(key(4)) is None
    cache.put(key(4), states, generation=cache.generation)
    assert cache.get(key(4)) is states
    off = PrefixCache(capacity_bytes=0)
    off.put(key(1), states, generation=0)
    assert len(off) == 0


def test_prefix_cache_across_calls_is_exact_and_dropped_when_stale(
    tiny_base: BaseModel, adapter_dirs: list[Path], candidates: list[str]
) -> None:
    engine = TorchEngine(tiny_base, prefix_cache_bytes=2**24)
    engine.load(refs(adapter_dirs[:K]))
    w = np.array([0.5, 0.3, 0.2])
    first = engine.score_shared(candidates, w)
    again = engine.score_shared(candidates[3:], w)  # same user, fewer candidates: same prefix
    np.testing.assert_allclose(again, first[3:], atol=SHARED_TOL, rtol=0.0)
    assert (engine.prefixes.stats().hits, engine.prefixes.stats().misses) == (1, 1)
    engine.score_shared(candidates, np.array([0.0, 0.0, 1.0]))  # other weights: another entry
    assert len(engine.prefixes) == 2

    engine.quarantine(0)  # only the entry that used shard 0 goes
    assert [k.weights for k in engine.prefixes._entries] == [(0.0, 0.0, 1.0)]
    np.testing.assert_allclose(engine.score_shared(candidates, w),
                               engine.score(candidates, np.tile([0.0, 0.6, 0.4], (len(candidates), 1))),
                               atol=SHARED_TOL, rtol=0.0)
    engine.release(0)
    engine.load_shard(AdapterRef(shard=2, version=2, path=adapter_dirs[K]))  # a swap: old versions go
    assert len(engine.prefixes) == 0
    np.testing.assert_allclose(engine.score_shared(candidates, w),
                               engine.score(candidates, np.tile(w, (len(candidates), 1))), atol=SHARED_TOL, rtol=0.0)


def test_engines_are_built_by_name_and_forget_their_cached_prompts(
    tiny_base: BaseModel, adapter_dirs: list[Path], candidates: list[str]
) -> None:
    from apa.engines import ENGINES, create_engine
    from apa.errors import ConfigError

    assert "torch" in ENGINES
    with pytest.raises(ConfigError, match="unknown engine"):
        create_engine("no-such-engine", tiny_base)
    engine = create_engine("torch", tiny_base, prefix_cache_bytes=2**24)
    assert isinstance(engine, TorchEngine)
    engine.load(refs(adapter_dirs[:K]))
    engine.score_shared(candidates, np.array([0.5, 0.3, 0.2]))
    assert engine.cache_stats()["entries"] == 1 and engine.cache_stats()["misses"] == 1
    engine.drop_cached()  # what a deletion asks of every engine
    assert engine.cache_stats()["entries"] == 0 and engine.cache_stats()["bytes"] == 0
