"""Aggregation weights by hand: four validation samples in 2-D, two shards.

    sample  embedding    history emb.  label  p(shard 0)  p(shard 1)  |err| 0  |err| 1
    v0      [1, 0]       [-1, 0]       1      0.9         0.6         0.1      0.4
    v1      [.8, .6]     [0, 1]        0      0.2         0.5         0.2      0.5
    v2      [0, 1]       [.8, .6]      1      0.4         0.8         0.6      0.2
    v3      [-1, 0]      [1, 0]        0      0.1         0.3         0.1      0.3
"""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from apa.aggregation import (
    PAPER,
    Attention,
    AttentionGrid,
    ValidationMemory,
    attention_weights,
    choose_attention,
    entropy,
    loo_shard_errors,
    shard_errors,
    weights,
)
from apa.embeddings import normalise_rows
from apa.errors import AllShardsQuarantined, ConfigError
from apa.metrics import auc
from tests.support import near_tie


@pytest.fixture
def memory() -> ValidationMemory:
    return ValidationMemory(
        sample_ids=("v0", "v1", "v2", "v3"),
        embeddings=np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]]),
        history_embeddings=np.array([[-1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [1.0, 0.0]]),
        labels=np.array([1, 0, 1, 0]),
        predictions=np.array([[0.9, 0.6], [0.2, 0.5], [0.4, 0.8], [0.1, 0.3]]),
    )


QUERIES = np.array([[1.0, 0.0], [0.0, 2.0]])  # the second is not unit length: cosine ignores scale


def test_shard_errors_by_hand(memory: ValidationMemory) -> None:
    errors = shard_errors(memory, QUERIES, mode="per-sample", attention=Attention(knn=2))
    # query 0: nearest v0, v1 -> (0.1+0.2)/2, (0.4+0.5)/2; query 1: nearest v2, v1 -> (0.6+0.2)/2, (0.2+0.5)/2
    np.testing.assert_allclose(errors, [[0.15, 0.45], [0.4, 0.35]], atol=1e-12)


def test_knn_larger_than_memory_uses_all(memory: ValidationMemory) -> None:
    errors = shard_errors(memory, QUERIES[:1], mode="per-sample", attention=Attention(knn=50))
    np.testing.assert_allclose(errors, [[0.25, 0.35]], atol=1e-12)  # mean of all four rows


def test_per_user_mode_uses_history_embeddings(memory: ValidationMemory) -> None:
    per_user = shard_errors(memory, QUERIES[:1], mode="per-user", attention=Attention(knn=1))
    per_sample = shard_errors(memory, QUERIES[:1], mode="per-sample", attention=Attention(knn=1))
    np.testing.assert_allclose(per_user, [[0.1, 0.3]], atol=1e-12)  # v3's history is [1, 0]
    np.testing.assert_allclose(per_sample, [[0.1, 0.4]], atol=1e-12)  # v0's prompt is [1, 0]


def test_attention_weights_are_softmax_of_minus_tau_error() -> None:
    errors = np.array([[0.15, 0.45], [0.4, 0.35]])
    got = attention_weights(errors, tau=10.0)
    first = 1 / (1 + math.exp(-10 * 0.3))
    second = 1 / (1 + math.exp(10 * 0.05))
    np.testing.assert_allclose(got, [[first, 1 - first], [second, 1 - second]], atol=1e-12)
    assert got[0, 0] == pytest.approx(0.9525741268, abs=1e-9)
    np.testing.assert_allclose(attention_weights(errors, tau=0.0), 0.5, atol=1e-12)


def test_large_tau_is_stable_and_picks_the_best_shard() -> None:
    got = attention_weights(np.array([[0.15, 0.45, 0.2]]), tau=1000.0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [[1.0, 0.0, 0.0]], atol=1e-12)


def test_inactive_shards_get_zero_weight() -> None:
    errors = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    got = attention_weights(errors, tau=10.0, active=[True, False, True])
    assert (got[:, 1] == 0.0).all()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)
    expected = 1 / (1 + math.exp(-10 * 0.2))  # shards 0 and 2 only
    np.testing.assert_allclose(got[:, [0, 2]], [[expected, 1 - expected], [1 - expected, expected]], atol=1e-12)
    with pytest.raises(AllShardsQuarantined):
        attention_weights(errors, tau=10.0, active=[False, False, False])


def test_weights_end_to_end(memory: ValidationMemory) -> None:
    setting = Attention("mae", 2, 10.0)
    got = weights(memory, QUERIES, attention=setting)
    np.testing.assert_allclose(got, attention_weights(np.array([[0.15, 0.45], [0.4, 0.35]]), tau=10.0),
                               atol=1e-12)
    np.testing.assert_allclose(weights(memory, QUERIES, attention=setting, active=[False, True]), [[0, 1], [0, 1]])


def test_weights_reject_bad_arguments(memory: ValidationMemory) -> None:
    with pytest.raises(ConfigError, match="weights mode"):
        weights(memory, QUERIES, mode="per-item")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Attention(knn=0)
    with pytest.raises(ConfigError):
        Attention(tau=-1.0)
    with pytest.raises(ConfigError, match="unknown attention error"):
        Attention(error="hinge")
    with pytest.raises(ConfigError, match="empty"):
        weights(memory.without(set(memory.sample_ids)), QUERIES)


def test_memory_save_load_joins_predictions(memory: ValidationMemory, tmp_path: Path) -> None:
    path = tmp_path / "memory" / "valid.npz"
    memory.save(path)
    shard0 = {"v0": 0.9, "v1": 0.2, "v2": 0.4, "v3": 0.1}
    shard1 = {"v0": 0.6, "v2": 0.8, "v3": 0.3}  # no prediction for v1: it drops out
    loaded = ValidationMemory.load(path, [shard0, shard1])
    assert loaded.sample_ids == ("v0", "v2", "v3")
    np.testing.assert_array_equal(loaded.embeddings, memory.embeddings[[0, 2, 3]])
    np.testing.assert_array_equal(loaded.history_embeddings, memory.history_embeddings[[0, 2, 3]])
    np.testing.assert_array_equal(loaded.labels, [1, 1, 0])
    np.testing.assert_allclose(loaded.predictions, [[0.9, 0.6], [0.4, 0.8], [0.1, 0.3]])

    full = ValidationMemory.load(path, [shard0, {**shard1, "v1": 0.5}])
    np.testing.assert_allclose(full.predictions, memory.predictions)
    assert ValidationMemory.load(path, []).predictions.shape == (4, 0)


def test_memory_without(memory: ValidationMemory) -> None:
    smaller = memory.without({"v1", "unknown"})
    assert smaller.sample_ids == ("v0", "v2", "v3")
    np.testing.assert_allclose(smaller.predictions, memory.predictions[[0, 2, 3]])
    np.testing.assert_array_equal(smaller.labels, [1, 1, 0])
    # v1 no longer counts among the neighbours: query 0's two nearest are now v0 and v2
    np.testing.assert_allclose(shard_errors(smaller, QUERIES[:1], mode="per-sample", attention=Attention(knn=2)),
                               [[0.35, 0.3]], atol=1e-12)
    assert memory.sample_ids == ("v0", "v1", "v2", "v3")  # the original is untouched


def test_leave_one_out_errors_skip_the_sample_itself(memory: ValidationMemory) -> None:
    # nearest *other* sample by prompt: v0 -> v1 (cos .8), v1 -> v0, v2 -> v1 (.6), v3 -> v2 (0 beats -.8, -1)
    np.testing.assert_allclose(loo_shard_errors(memory, mode="per-sample", attention=Attention(knn=1)),
                               [[0.2, 0.5], [0.1, 0.4], [0.2, 0.5], [0.6, 0.2]], atol=1e-12)
    # knn above m - 1, or all, means every other sample: v0 -> mean of v1, v2, v3
    for knn in (10, None):
        np.testing.assert_allclose(loo_shard_errors(memory, mode="per-sample", attention=Attention(knn=knn))[0],
                                   [0.3, 1.0 / 3], atol=1e-12)


def two_experts() -> ValidationMemory:
    """Two clusters; shard 0 is right on the first and inverted on the second, shard 1 the reverse,
    so their uniform average says 0.5 everywhere and only the attention can rank."""
    return ValidationMemory(
        sample_ids=("a0", "a1", "b0", "b1"),
        embeddings=normalise_rows(np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])),
        history_embeddings=normalise_rows(np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])),
        labels=np.array([1, 0, 1, 0]),
        predictions=np.array([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]),
    )


def test_error_functions_by_hand(memory: ValidationMemory) -> None:
    # v0: label 1, p = .9 / .6; v1: label 0, p = .2 / .5
    np.testing.assert_allclose(memory.errors("mae")[:2], [[0.1, 0.4], [0.2, 0.5]], atol=1e-12)
    np.testing.assert_allclose(memory.errors("brier")[:2], [[0.01, 0.16], [0.04, 0.25]], atol=1e-12)
    np.testing.assert_allclose(memory.errors("logloss")[:2],
                               [[-math.log(0.9), -math.log(0.6)], [-math.log(0.8), -math.log(0.5)]], atol=1e-12)
    got = shard_errors(memory, QUERIES[:1], mode="per-sample", attention=Attention("brier", 2, 1.0))
    np.testing.assert_allclose(got, [[(0.01 + 0.04) / 2, (0.16 + 0.25) / 2]], atol=1e-12)


def test_entropy_of_weights() -> None:
    np.testing.assert_allclose(entropy(np.array([[1.0, 0.0], [0.5, 0.5]])), [0.0, math.log(2)], atol=1e-12)


def test_choose_attention_prefers_attention_when_the_uniform_average_cannot_rank() -> None:
    # leave one out, knn=1: a0 is weighted by a1 (shard 0's error .1, shard 1's .9), so any tau > 0
    # leans to the right expert on every sample and ranks perfectly; tau=0 ties every sample at 0.5
    choice = choose_attention(two_experts(), grid=AttentionGrid(("mae",), (1,), (1000.0, 0.0, 1.0)))
    assert choice.table == {"mae/1/1000": 1.0, "mae/1/0": 0.5, "mae/1/1": 1.0}
    assert choice.attention == Attention("mae", 1, 1.0)  # the smaller of the tied best
    assert choice.valid_auc == 1.0 and choice.samples == 4


def test_choose_attention_prefers_the_uniform_average_when_attention_misleads() -> None:
    # shard 0 says 0 on the first cluster and 1 on the second: right on one sample of each, so a
    # neighbour's small error sends its weight to the wrong sample; shard 1 is weak but right everywhere
    memory = replace(two_experts(), predictions=np.array([[0.0, 0.6], [0.0, 0.4], [1.0, 0.6], [1.0, 0.4]]))
    choice = choose_attention(memory, grid=AttentionGrid(("mae",), (1,), (0.0, 1000.0)))
    # uniform: .3, .2, .8, .7 -> 3 of 4 pairs; tau 1000: 0, .4, .6, 1 -> 1 of 4
    assert choice.table == {"mae/1/0": 0.75, "mae/1/1000": 0.25}
    assert choice.attention.tau == 0.0


def test_choose_attention_prefers_the_larger_neighbourhood_on_a_tie() -> None:
    # with two experts and two samples per cluster, one neighbour (the cluster mate) routes right and
    # every other sample averages both experts' errors out: knn=1 must win on AUC, not by preference
    choice = choose_attention(two_experts(), grid=AttentionGrid(("mae",), (1, None), (1000.0,)))
    assert choice.table["mae/1/1000"] == 1.0 > choice.table["mae/all/1000"]
    assert choice.attention.knn == 1
    tie = choose_attention(two_experts(), grid=AttentionGrid(("mae",), (3, None), (1000.0,)))  # 3 = all others
    assert tie.table["mae/3/1000"] == tie.table["mae/all/1000"] and tie.attention.knn == 3  # equal sizes: first


def test_choose_attention_table_equals_the_direct_computation(memory: ValidationMemory) -> None:
    """The grid's shortcut (cumulative sums over the sorted neighbours) is the plain leave-one-out."""
    grid = AttentionGrid(("mae", "brier", "logloss"), (1, 2, None), (0.0, 3.0, 1000.0))
    choice = choose_attention(memory, grid=grid)
    for setting in grid.settings():
        w = attention_weights(loo_shard_errors(memory, mode="per-sample", attention=setting), tau=setting.tau)
        assert choice.table[setting.label()] == round(auc(memory.labels, (w * memory.predictions).sum(axis=1)), 4)
    assert PAPER.label() == "mae/20/1000"


def test_choose_attention_rejects_what_it_cannot_use(memory: ValidationMemory) -> None:
    with pytest.raises(ConfigError):
        AttentionGrid(taus=())
    with pytest.raises(ConfigError):
        AttentionGrid(taus=(-1.0,))
    with pytest.raises(ConfigError):
        choose_attention(memory.without({"v1", "v2", "v3"}))  # one sample has no other to learn from
    with pytest.raises(ConfigError):
        choose_attention(memory.without({"v1", "v3"}))  # both left are liked: no AUC


def test_neighbours_follow_the_exact_similarity_not_float32_rounding() -> None:
    memory = ValidationMemory(  # row 1 is nearer by half a float32 step; its shard 0 error is 0.5, row 0's 0.1
        sample_ids=("v0", "v1"), embeddings=near_tie.ROWS, history_embeddings=near_tie.ROWS,
        labels=np.array([1, 1]), predictions=np.array([[0.9, 0.9], [0.5, 0.9]]),
    )
    errors = shard_errors(memory, near_tie.QUERY, mode="per-sample", attention=Attention(knn=1))
    np.testing.assert_allclose(errors, [[0.5, 0.1]], atol=1e-12)
