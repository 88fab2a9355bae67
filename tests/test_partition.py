"""Partitioners: balanced sizes, full coverage, cluster recovery, the capacity rule."""

import numpy as np
import pytest

from apa.embeddings import normalise_rows
from apa.errors import ConfigError
from apa.partition import PARTITIONERS, balanced_assignment, partition
from apa.samples import Sample

SIZES = [(12, 4), (13, 4), (10, 3), (7, 2), (5, 5), (31, 6), (9, 1)]


def _samples(n: int, users: int = 5) -> list[Sample]:
    return [
        Sample(sample_id=f"u{i % users}:{i}:{i}", user_id=f"u{i % users}", target_item_id=str(i), label=i % 2,
               history_item_ids=("0",), history_liked=(True,), interaction_keys=(f"u{i % users}:0:0",))
        for i in range(n)
    ]


def _clustered(per_cluster: list[int], dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around orthogonal directions (cosine ~0.99 inside a cluster, ~0 across): [n, dim], truth [n]."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for c, count in enumerate(per_cluster):
        direction = np.zeros(dim)
        direction[c] = 1.0
        rows.append(direction + 0.05 * rng.standard_normal((count, dim)))
        truth += [c] * count
    order = rng.permutation(len(truth))  # interleave the clusters
    return np.concatenate(rows)[order], np.array(truth)[order]


def _same_clusters(found: np.ndarray, truth: np.ndarray) -> bool:
    """Equal up to renaming the shards."""
    pairs = set(zip(found.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(found.tolist())) == len(set(truth.tolist()))


@pytest.mark.parametrize(("n", "k"), SIZES)
@pytest.mark.parametrize("name", ["semantic", "random"])
def test_sizes_differ_by_at_most_one(name: str, n: int, k: int) -> None:
    embeddings = np.random.default_rng(n * k).standard_normal((n, 8))
    result = partition(name, _samples(n), embeddings, k=k, seed=3)
    assert result.assignment.shape == (n,)
    sizes = np.bincount(result.assignment, minlength=k)
    assert len(sizes) == k
    assert sizes.sum() == n  # every sample assigned exactly once
    assert sorted(sizes.tolist()) == sorted([n // k + 1] * (n % k) + [n // k] * (k - n % k))


def test_semantic_recovers_clear_clusters() -> None:
    embeddings, truth = _clustered([6, 6, 6])
    result = partition("semantic", _samples(18), embeddings, k=3, seed=0)
    assert _same_clusters(result.assignment, truth)
    assert result.centres is not None
    assert result.centres.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(result.centres, axis=1), 1.0, atol=1e-9)
    # each centre points along its cluster's direction
    assert sorted(np.argmax(result.centres, axis=1).tolist()) == [0, 1, 2]


def test_semantic_balances_uneven_clusters() -> None:
    embeddings, truth = _clustered([8, 2, 2])  # one cluster too big for a balanced shard
    result = partition("semantic", _samples(12), embeddings, k=3, seed=0)
    assert np.bincount(result.assignment).tolist() == [4, 4, 4]
    # the two small clusters stay whole, each in its own shard
    for small in (1, 2):
        assert len(set(result.assignment[truth == small].tolist())) == 1
    assert result.assignment[truth == 1][0] != result.assignment[truth == 2][0]


def test_partitions_are_deterministic() -> None:
    embeddings = np.random.default_rng(0).standard_normal((20, 8))
    for name in PARTITIONERS:
        a = partition(name, _samples(20), embeddings, k=3, seed=5).assignment
        b = partition(name, _samples(20), embeddings, k=3, seed=5).assignment
        np.testing.assert_array_equal(a, b)


def test_balanced_assignment_capacity_rule_by_hand() -> None:
    # 5 samples, 2 shards: one shard may hold 3, the other 2. Every sample prefers shard 0.
    distance = np.array([[0.0, 0.9], [0.1, 0.8], [0.2, 0.7], [0.3, 0.6], [0.4, 0.5]])
    # sorted pairs: samples 0, 1, 2 take shard 0 (the one big slot), then 3 and 4 go to shard 1.
    np.testing.assert_array_equal(balanced_assignment(distance), [0, 0, 0, 1, 1])


def test_balanced_assignment_only_n_mod_k_shards_hold_ceil() -> None:
    # 7 samples, 3 shards, everyone closest to shard 0, then 1, then 2: sizes must be 3, 2, 2.
    distance = np.tile([0.0, 0.5, 1.0], (7, 1)) + np.arange(7)[:, None] * 0.01
    assignment = balanced_assignment(distance)
    np.testing.assert_array_equal(assignment, [0, 0, 0, 1, 1, 2, 2])
    rng = np.random.default_rng(1)
    for n, k in SIZES:
        sizes = np.bincount(balanced_assignment(rng.random((n, k))), minlength=k)
        assert (sizes == -(-n // k)).sum() == (n % k if n % k else k)
        assert sizes.max() - sizes.min() <= 1


def test_user_partition_keeps_users_whole() -> None:
    samples = _samples(23, users=7)
    result = partition("user", samples, np.zeros((23, 0)), k=3, seed=0)
    shard_of_user: dict[str, set[int]] = {}
    for sample, shard in zip(samples, result.assignment.tolist(), strict=True):
        shard_of_user.setdefault(sample.user_id, set()).add(shard)
    assert all(len(shards) == 1 for shards in shard_of_user.values())
    assert set(result.assignment.tolist()) == {0, 1, 2}
    assert result.centres is None


def test_user_partition_with_too_few_users_is_an_error() -> None:
    with pytest.raises(ConfigError, match="empty"):
        partition("user", _samples(10, users=2), np.zeros((10, 0)), k=3, seed=0)


def test_unknown_partitioner_and_bad_k() -> None:
    with pytest.raises(ConfigError, match="unknown partitioner"):
        partition("kmeans++", _samples(4), np.zeros((4, 2)), k=2, seed=0)
    with pytest.raises(ConfigError):
        partition("random", _samples(4), np.zeros((4, 2)), k=5, seed=0)
    with pytest.raises(ConfigError):
        partition("random", _samples(4), np.zeros((4, 2)), k=0, seed=0)


# -- new samples (online learning) ------------------------------------------------------------------
def _unit(*rows: list[float]) -> np.ndarray:
    return normalise_rows(np.array(rows, dtype=np.float64))


def test_a_new_sample_joins_its_nearest_centre_and_ties_go_to_the_smaller_shard() -> None:
    from apa.partition import Incoming, assign

    centres = _unit([1, 0], [0, 1])
    new = Incoming(sample_ids=["a", "b", "c"], user_ids=["u", "u", "u"], sizes=np.array([10, 10]), balance=2.0,
                   unit=_unit([1, 0.1], [0.1, 1], [1, 1]), centres=centres)
    assert assign("semantic", new).tolist() == [0, 1, 0], "a tie between equal shards: the lower number"
    smaller = Incoming(sample_ids=["c"], user_ids=["u"], sizes=np.array([10, 9]), balance=2.0,
                       unit=_unit([1, 1]), centres=centres)
    assert assign("semantic", smaller).tolist() == [1], "a tie: the smaller shard"


def test_no_shard_grows_past_the_balance_bound() -> None:
    from apa.partition import Incoming, assign

    centres = _unit([1, 0], [0, 1])
    four = _unit([1, 0.01], [1, 0.02], [1, 0.03], [1, 0.04])  # all nearest shard 0
    strict = Incoming(sample_ids=list("abcd"), user_ids=list("uuuu"), sizes=np.array([4, 4]), balance=1.0,
                      unit=four, centres=centres)
    assert assign("semantic", strict).tolist() == [0, 0, 1, 1], "cap ceil(12 / 2) = 6: two go to shard 0"
    loose = Incoming(sample_ids=list("abcd"), user_ids=list("uuuu"), sizes=np.array([4, 4]), balance=1.5,
                     unit=four, centres=centres)
    assert assign("semantic", loose).tolist() == [0, 0, 0, 0], "cap ceil(6 * 1.5) = 9"
    over = Incoming(sample_ids=["a"], user_ids=["u"], sizes=np.array([20, 2]), unit=four[:1], centres=centres)
    assert assign("semantic", over).tolist() == [1], "a shard already over the bound takes nothing"


def test_centres_are_the_unit_mean_of_their_live_members() -> None:
    from apa.partition import member_centres

    members = _unit([1, 0], [0, 1], [1, 0])
    fallback = _unit([0.6, 0.8], [0.8, 0.6], [1, 1])
    centres = member_centres(members, np.array([0, 0, 1]), 3, fallback)
    assert centres[0] == pytest.approx(_unit([1, 1])[0])
    assert centres[1] == pytest.approx([1.0, 0.0])
    assert centres[2] == pytest.approx(fallback[2]), "no members: the fallback centre"


def test_random_and_user_rules_for_new_samples() -> None:
    from apa.partition import Incoming, assign

    ids = [f"u:{i}:1" for i in range(200)]
    first = assign("random", Incoming(sample_ids=ids, user_ids=["u"] * 200, sizes=np.zeros(4, int), seed=3))
    again = assign("random", Incoming(sample_ids=ids, user_ids=["u"] * 200, sizes=np.array([50, 0, 0, 0]), seed=3))
    assert first.tolist() == again.tolist(), "a seeded hash of the id: sizes play no part"
    assert set(first.tolist()) == {0, 1, 2, 3}
    other = assign("random", Incoming(sample_ids=ids, user_ids=["u"] * 200, sizes=np.zeros(4, int), seed=4))
    assert other.tolist() != first.tolist()
    users = assign("user", Incoming(sample_ids=["a", "b", "c", "d"], user_ids=["old", "new", "new", "other"],
                                    sizes=np.array([3, 1, 1]), user_shards={"old": 0}))
    assert users.tolist() == [0, 1, 1, 2], "known user: their shard; new users: the least loaded, lower first"
