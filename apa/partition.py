"""Partitioners: which shard trains on which sample. Chosen by name from ``PARTITIONERS``.

* ``semantic`` (APA): spherical K-means (cosine) on the sample embeddings, then the balanced greedy
  assignment — all (sample, centre) pairs sorted by distance, each unassigned sample goes to its
  centre while that shard has room. ``N mod K`` shards may hold ``ceil(N/K)``, the others
  ``floor(N/K)``, so sizes differ by at most one.
* ``random`` (SISA): a seeded permutation cut into K near-equal parts.
* ``user``: all samples of a user in one shard (largest users first, to the least loaded shard).

New samples (online learning) join one shard each by the same partition's rule, chosen by name from
``ASSIGNERS`` (:func:`assign`):

* ``semantic``: the nearest centre by cosine, a centre being the unit mean of its shard's live
  members' embeddings (:func:`member_centres`). Balance: no shard grows past
  ``ceil((N + n) / K * balance)`` (N live training samples, n new ones; ``balance`` = 1 is the
  partition's own bound); within a batch the (sample, shard) pairs go nearest first, as the balanced
  greedy does, and ties go to the smaller shard, then the lower shard number.
* ``random``: a seeded hash of the sample id, modulo K (SISA's shards stay a random partition).
* ``user``: the shard that holds the user's training samples; a user with none goes to the least
  loaded shard (ties: the lower number), as ``by_user`` would place a new user.
"""

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from apa.embeddings import cosine, normalise_rows
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
            dist = 1.0 - np.max(cosine(unit, np.stack(centres)), axis=1)  # [n]
            dist = np.clip(dist, 0.0, None)
            probs = dist / dist.sum() if dist.sum() > 0 else np.full(len(unit), 1 / len(unit))
            centres.append(unit[rng.choice(len(unit), p=probs)])
        c = np.stack(centres)  # [k, dim]
        for _ in range(iterations):
            labels = np.argmax(cosine(unit, c), axis=1)  # [n]
            new = np.stack([
                unit[labels == j].sum(axis=0) if np.any(labels == j) else c[j] for j in range(k)
            ])
            new = normalise_rows(new)
            if np.allclose(new, c):
                break
            c = new
        cost = float(np.sum(1.0 - np.max(cosine(unit, c), axis=1)))
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
    distance = 1.0 - cosine(unit, centres)  # [n, K] cosine distance
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


@dataclass(frozen=True)
class Incoming:
    """New training samples to place, and what the shards hold now."""

    sample_ids: Sequence[str]
    user_ids: Sequence[str]
    sizes: np.ndarray  # [K] live training samples per shard
    seed: int = 0
    unit: np.ndarray | None = None  # [n, hidden] unit embeddings of the new samples (semantic)
    centres: np.ndarray | None = None  # [K, hidden] unit centres (semantic)
    user_shards: dict[str, int] | None = None  # user -> the shard holding their training samples (user)
    balance: float = 1.0  # semantic: a shard holds at most ceil((N + n) / K * balance)


def member_centres(unit: np.ndarray, shard_of: np.ndarray, k: int, fallback: np.ndarray) -> np.ndarray:
    """Each shard's centre: the unit mean of its members' unit embeddings ([m, hidden], ``shard_of`` [m]);
    a shard without members keeps its ``fallback`` row: [K, hidden]."""
    centres = np.array(fallback, dtype=np.float64, copy=True)  # [K, hidden]
    for shard in range(k):
        members = unit[shard_of == shard]  # [m_k, hidden]
        if len(members):
            centres[shard] = members.sum(axis=0)
    return normalise_rows(centres)


def assign_semantic(new: Incoming) -> np.ndarray:
    if new.unit is None or new.centres is None:
        raise ConfigError("semantic assignment needs the samples' embeddings and the shards' centres")
    n, k = len(new.sample_ids), len(new.sizes)
    cap = math.ceil((int(new.sizes.sum()) + n) / k * max(1.0, new.balance))
    room = np.maximum(cap - new.sizes, 0)  # sums to >= n: every sample finds a shard
    distance = 1.0 - cosine(new.unit, new.centres)  # [n, K]
    pairs = sorted((float(distance[i, j]), int(new.sizes[j]), j, i) for i in range(n) for j in range(k))
    assignment = np.full(n, -1, dtype=np.int64)
    for _, _, shard, sample in pairs:
        if assignment[sample] < 0 and room[shard] > 0:
            assignment[sample] = shard
            room[shard] -= 1
    return assignment


def assign_random(new: Incoming) -> np.ndarray:
    k = len(new.sizes)
    return np.array([int.from_bytes(hashlib.sha256(f"shard:{new.seed}:{sid}".encode()).digest()[:8], "big") % k
                     for sid in new.sample_ids], dtype=np.int64)


def assign_by_user(new: Incoming) -> np.ndarray:
    loads = np.array(new.sizes, dtype=np.int64, copy=True)
    known = dict(new.user_shards or {})
    assignment = np.empty(len(new.sample_ids), dtype=np.int64)
    for i, user in enumerate(new.user_ids):
        if user not in known:
            known[user] = int(np.argmin(loads))  # the first of the least loaded
        assignment[i] = known[user]
        loads[known[user]] += 1
    return assignment


Assigner = Callable[[Incoming], np.ndarray]
ASSIGNERS: dict[str, Assigner] = {"semantic": assign_semantic, "random": assign_random, "user": assign_by_user}


def assign(name: str, new: Incoming) -> np.ndarray:
    """The shard of each new training sample under partition ``name``: [n]."""
    if name not in ASSIGNERS:
        raise ConfigError(f"unknown partitioner {name!r}; choose from {sorted(ASSIGNERS)}")
    if not len(new.sample_ids):
        return np.zeros(0, dtype=np.int64)
    return ASSIGNERS[name](new)
