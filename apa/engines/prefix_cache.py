"""Recent users' prompt prefixes, as keys and values, bounded in bytes (least recently used goes first).

An entry is keyed by everything its tensors depend on: the prefix's token ids, the effective shard
weights, the mixture mode and the (shard, version) of every adapter in the stack. A key can therefore
never return stale tensors; the engine still drops entries early where they stopped being servable:
on a swap (old versions), on a quarantine (entries that used the shard) and on request (a deletion:
the prefix text holds the user's history).
"""

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from apa.model import KeyValues


@dataclass(frozen=True)
class PrefixKey:
    tokens: tuple[int, ...]
    weights: tuple[float, ...]  # effective weights, [K]
    mode: str
    versions: tuple[tuple[int, int], ...]  # (shard, version) in shard order


@dataclass(frozen=True)
class PrefixCacheStats:
    hits: int
    misses: int
    entries: int
    bytes: int
    capacity_bytes: int


def size_of(states: KeyValues) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in states)


class PrefixCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[PrefixKey, tuple[KeyValues, int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._generation = 0  # bumped by every drop: a put computed before one is refused
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return self._generation

    def get(self, key: PrefixKey) -> KeyValues | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: PrefixKey, states: KeyValues, *, generation: int) -> None:
        """Keep ``states`` unless a drop happened since ``generation`` was read (before the live adapters
        were): a call under way during a swap, quarantine or deletion must not store what it dropped."""
        size = size_of(states)
        if size > self.capacity_bytes:
            return  # also covers a capacity of 0: the cache is off
        with self._lock:
            if generation != self._generation:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (states, size)
            self._bytes += size
            while self._bytes > self.capacity_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def drop(self, stale: Callable[[PrefixKey], bool]) -> int:
        """Remove every entry whose key is ``stale``; returns how many."""
        with self._lock:
            self._generation += 1
            keys = [key for key in self._entries if stale(key)]
            for key in keys:
                self._bytes -= self._entries.pop(key)[1]
            return len(keys)

    def clear(self) -> None:
        self.drop(lambda key: True)

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(hits=self._hits, misses=self._misses, entries=len(self._entries),
                                    bytes=self._bytes, capacity_bytes=self.capacity_bytes)

    def __len__(self) -> int:
        return len(self._entries)
