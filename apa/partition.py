"""Partitioners: which shard trains on which sample. Chosen by name from ``PARTITIONERS``.

* ``semantic`` (APA): spherical K-means (cosine) on the sample embeddings, then the balanced greedy
  assignment — all (sample, centre) pairs sorted by distance, each unassigned sample goes to its
  centre while that shard has room. ``N mod K`` shards may hold ``ceil(N/K)``, the others
  ``floor(N/K)``, so sizes differ by at most one.
* ``random`` (SISA): a seeded permutation cut into K near-equal parts.
* ``user``: all samples of a user in one shard (largest users first, to the least loaded shard).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from apa.embeddings import normalise_rows
from apa.errors import ConfigError
from apa.samples import Sample


@dataclass(frozen=True)
class Partition:
    assignment: np.ndarray  # [n] shard of each sample
    centres: np.ndarray | None  # [K, hidden] unit vectors (semantic only)


def spherical_kmeans(
    unit: np.ndarray, k: int, *, seed: int, iterations: int = 100, restarts: int = 4
) -> np.ndarray:
    """K-means with cosine distance on unit rows (k-means++ init, best of ``restarts``): [k, dim]."""
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centres = [unit[rng.integers(len(unit))]]
        for _ in range(1, k):
            dist = 1.0 - np.max(unit @ np.stack(centres).T, axis=1)  # [n]
            dist = np.clip(dist, 0.0, None)
            probs = dist / dist.sum() if dist.sum() > 0 else np.full(len(unit), 1 / len(unit))
            centres.append(unit[rng.choice(len(unit), p=probs)])
        c = np.stack(centres)  # [k, dim]
        for _ in range(iterations):
            labels = np.argmax(unit @ c.T, axis=1)  # [n]
            new = np.stack([
                unit[labels == j].sum(axis=0) if np.any(labels == j) else c[j] for j in range(k)
            ])
            new = normalise_rows(new)
            if np.allclose(new, c):
                break
            c = new
        cost = float(np.sum(1.0 - np.max(unit @ c.T, axis=1)))
        if cost < best_cost:
            best, best_cost = c, cost
    assert best is not None
    return best


def balanced_assignment(distance: np.ndarray) -> np.ndarray:
    """Greedy balanced assignment from a [n, K] distance matrix (sizes differ by at most one)."""
    n, k = distance.shape
    floor, extra = divmod(n, k)  # `extra` shards may hold floor + 1
    sizes = np.zeros(k, dtype=np.int64)
    big = 0
    assignment = np.full(n, -1, dtype=np.int64)
    for flat in np.argsort(distance, axis=None, kind="stable"):
        sample, shard = divmod(int(flat), k)
        if assignment[sample] >= 0:
            continue
        if not (sizes[shard] < floor or (sizes[shard] == floor and big < extra)):
            continue  # full: at floor + 1, or at floor once every larger slot is taken
        assignment[sample] = shard
        sizes[shard] += 1
        if sizes[shard] == floor + 1:
            big += 1
    assert (assignment >= 0).all()
    return assignment


def semantic(samples: Sequence[Sample], embeddings: np.ndarray, k: int, seed: int) -> Partition:
    unit = normalise_rows(embeddings)
    centres = spherical_kmeans(unit, k, seed=seed)
    distance = 1.0 - unit @ centres.T  # [n, K] cosine distance
    return Partition(assignment=balanced_assignment(distance), centres=centres)


def random_split(samples: Sequence[Sample], embeddings: np.ndarray, k: int, seed: int) -> Partition:
    order = np.random.default_rng(seed).permutation(len(samples))
    assignment = np.empty(len(samples), dtype=np.int64)
    for shard, part in enumerate(np.array_split(order, k)):
        assignment[part] = shard
    return Partition(assignment=assignment, centres=None)


def by_user(samples: Sequence[Sample], embeddings: np.ndarray, k: int, seed: int) -> Partition:
    users: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        users.setdefault(sample.user_id, []).append(i)
    loads = np.zeros(k, dtype=np.int64)
    assignment = np.empty(len(samples), dtype=np.int64)
    for _, members in sorted(users.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        shard = int(np.argmin(loads))
        assignment[members] = shard
        loads[shard] += len(members)
    return Partition(assignment=assignment, centres=None)


Partitioner = Callable[[Sequence[Sample], np.ndarray, int, int], Partition]
PARTITIONERS: dict[str, Partitioner] = {"semantic": semantic, "random": random_split, "user": by_user}
NEEDS_EMBEDDINGS = frozenset({"semantic"})


def partition(name: str, samples: Sequence[Sample], embeddings: np.ndarray, *, k: int, seed: int) -> Partition:
    if name not in PARTITIONERS:
        raise ConfigError(f"unknown partitioner {name!r}; choose from {sorted(PARTITIONERS)}")
    if not 1 <= k <= len(samples):
        raise ConfigError(f"cannot cut {len(samples)} samples into {k} shards")
    result = PARTITIONERS[name](samples, embeddings, k, seed)
    empty = [s for s in range(k) if not np.any(result.assignment == s)]
    if empty:
        raise ConfigError(f"partition {name!r} left shard(s) {empty} empty (too few users or samples?)")
    return result
