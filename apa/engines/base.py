"""The engine protocol, shared by every engine."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from apa.errors import AllShardsQuarantined

Mode = Literal["nd", "d"]


@dataclass(frozen=True)
class AdapterRef:
    """One immutable adapter version on disk. Engines key adapters by (shard, version), never by path."""

    shard: int
    version: int
    path: Path


@dataclass(frozen=True)
class ShardState:
    shard: int
    version: int
    active: bool  # False while quarantined

def effective_weights(weights: np.ndarray, active: frozenset[int]) -> np.ndarray:
    """What every engine scores with: the quarantined shards zeroed and each row renormalised over the
    active ones: [n, K]. A row with no weight left on an active shard falls back to uniform over them.
    """
    k = weights.shape[1]
    mask = np.array([s in active for s in range(k)], dtype=np.float64)  # [K]
    if not mask.any():
        raise AllShardsQuarantined("every shard is quarantined")
    w = np.clip(weights.astype(np.float64), 0.0, None) * mask  # [n, K]
    totals = w.sum(axis=1, keepdims=True)  # [n, 1]
    uniform = np.broadcast_to(mask / mask.sum(), w.shape)
    return np.where(totals > 0, w / np.where(totals > 0, totals, 1.0), uniform)


class Engine(Protocol):
    def load(self, adapters: Sequence[AdapterRef]) -> None:
        """Replace every shard at once (start-up)."""

    def load_shard(self, adapter: AdapterRef) -> None:
        """Swap one shard's version atomically; in-flight batches finish on the old one."""

    def load_shards(self, adapters: Sequence[AdapterRef]) -> None:
        """Swap several shards' versions in one atomic step (unchanged shards are not read again)."""

    def quarantine(self, shard: int) -> None: ...

    def release(self, shard: int) -> None: ...

    def live(self) -> list[ShardState]: ...

    def drop_cached(self) -> None:
        """Forget everything computed from prompt text and kept across calls (a deletion: a prompt
        holds a user's history). Engines without such caches do nothing."""

    def cache_stats(self) -> dict[str, int]:
        """What those caches hold, by statistic (hits, misses, entries, bytes, ...); empty without any."""
        ...

    def close(self) -> None:
        """Give back what the engine holds outside this process (a server's adapter slots, connections);
        the gateway calls it when it stops. Engines holding nothing do nothing."""

    def score(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
              batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt; ``weights`` is [n, K] in shard order (quarantined shards get 0)."""
        ...

    def score_shared(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
                     batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt, every prompt with the same ``weights`` ([K]); equal to ``score`` with that
        row repeated, but a prefix the prompts share may be computed once."""
        ...
