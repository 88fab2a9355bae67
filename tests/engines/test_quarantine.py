"""A quarantined shard's weight goes to the clean shards, renormalised; all quarantined refuses to score."""

from pathlib import Path

import numpy as np
import pytest

from apa.engines.base import effective_weights
from apa.engines.torch import TorchEngine
from apa.errors import AllShardsQuarantined
from apa.model import BaseModel
from tests.conftest import load_tiny
from tests.support.adapters import SAME_ATOL, K, one_hot, refs

# -- (c) quarantine ---------------------------------------------------------------------------------

def test_quarantine_equals_zeroed_renormalised_weights(
    engine: TorchEngine, tiny_base: BaseModel, adapter_dirs: list[Path], texts: list[str]
) -> None:
    weights = np.random.default_rng(1).dirichlet(np.ones(K), size=len(texts))  # [n, K]
    for j in range(K):
        expected_w = weights.copy()
        expected_w[:, j] = 0.0
        expected_w /= expected_w.sum(axis=1, keepdims=True)
        expected = engine.score(texts, expected_w)
        engine.quarantine(j)
        try:
            np.testing.assert_allclose(engine.score(texts, weights), expected, atol=SAME_ATOL, rtol=0.0)
            assert [s.active for s in engine.live()] == [k != j for k in range(K)]
        finally:
            engine.release(j)
    assert all(s.active for s in engine.live())


def test_quarantine_one_hot_on_a_clean_shard_equals_an_engine_without_the_shard(
    engine: TorchEngine, tiny_model_dir: Path, adapter_dirs: list[Path], texts: list[str]
) -> None:
    engine.quarantine(0)
    served = engine.score(texts, one_hot(len(texts), K, 1))
    without = TorchEngine(load_tiny(tiny_model_dir))
    without.load(refs(adapter_dirs[1:K]))  # old shards 1, 2 renumbered 0, 1
    np.testing.assert_allclose(served, without.score(texts, one_hot(len(texts), K - 1, 0)), atol=1e-5, rtol=0.0)


def test_quarantined_shard_with_all_the_weight_falls_back_to_uniform_over_clean_shards(
    engine: TorchEngine, texts: list[str]
) -> None:
    engine.quarantine(2)
    fallback = engine.score(texts, one_hot(len(texts), K, 2))
    np.testing.assert_allclose(fallback, engine.score(texts, np.tile([0.5, 0.5, 0.0], (len(texts), 1))),
                               atol=SAME_ATOL, rtol=0.0)


def test_effective_weights_by_hand() -> None:
    weights = np.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [-1.0, 1.0, 1.0]])
    got = effective_weights(weights, frozenset({0, 1}))
    np.testing.assert_allclose(got, [[0.4, 0.6, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]], atol=1e-12)
    with pytest.raises(AllShardsQuarantined):
        effective_weights(weights, frozenset())


def test_all_quarantined_refuses_to_score(engine: TorchEngine, texts: list[str]) -> None:
    for k in range(K):
        engine.quarantine(k)
    with pytest.raises(AllShardsQuarantined):
        engine.score(texts, one_hot(len(texts), K, 0))
    engine.release(1)
    assert engine.score(texts, one_hot(len(texts), K, 0)).shape == (len(texts),)
