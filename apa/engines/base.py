"""The engine protocol, shared by every engine."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from apa.engines.prefix_cache import PrefixCacheStats

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


class PrefixStore(Protocol):
    """What the gateway asks of an engine's prefix cache: forget it all (a user deleted data), report it."""

    def clear(self) -> None: ...

    def stats(self) -> PrefixCacheStats: ...


class Engine(Protocol):
    @property
    def prefixes(self) -> PrefixStore: ...

    def load(self, adapters: Sequence[AdapterRef]) -> None:
        """Replace every shard at once (start-up)."""

    def load_shard(self, adapter: AdapterRef) -> None:
        """Swap one shard's version atomically; in-flight batches finish on the old one."""

    def load_shards(self, adapters: Sequence[AdapterRef]) -> None:
        """Swap several shards' versions in one atomic step (unchanged shards are not read again)."""

    def quarantine(self, shard: int) -> None: ...

    def release(self, shard: int) -> None: ...

    def live(self) -> list[ShardState]: ...

    def score(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
              batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt; ``weights`` is [n, K] in shard order (quarantined shards get 0)."""
        ...

    def score_shared(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
                     batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt, every prompt with the same ``weights`` ([K]); equal to ``score`` with that
        row repeated, but a prefix the prompts share may be computed once."""
        ...
