"""The vLLM engine's adapter bookkeeping: which shard versions are live, which merged adapters the server
holds, which requests use them, and when one leaves.

Loaded adapters are kept in an LRU of ``max_adapters``; an adapter leaves it (and the server, and the
disk) when evicted, when a shard it contains is quarantined, or when a shard version it contains is
swapped out. One leaving while a request uses it is unloaded when that request ends. A quarantine
takes effect for every pick afterwards: registering an adapter re-checks the live view under the
lock, so an adapter built from a view older than a quarantine is never used.

The server itself is reached through the two callables given (``vllm.py`` is the HTTP client).
"""

import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apa.engines.base import Mode, effective_weights
from apa.engines.merge import ShardAdapter, adapter_name, snap_weights, write_merged
from apa.errors import AdapterMismatch, EngineUnavailable


@dataclass(frozen=True)
class Live:
    """The shard versions in service (shard order 0..K-1) and the shards not quarantined."""

    shards: tuple[ShardAdapter, ...] | None
    active: frozenset[int]


@dataclass
class _Loaded:
    folder: Path
    versions: frozenset[tuple[int, int]]  # (shard, version) of every shard with weight in it
    users: int = 0  # requests using it now
    retired: bool = False  # never picked again; unloaded when its last user is done


class Adapters:
    """The live view and the registry of merged adapters on the server, under one lock."""

    def __init__(self, adapter_dir: Path, *, max_adapters: int, weight_step: float,
                 load: Callable[[str, Path], None], unload: Callable[[str], None]) -> None:
        """``load(name, folder)`` puts a merged adapter on the server, ``unload(name)`` takes it off
        (best effort: it logs and returns when the server does not answer)."""
        if max_adapters < 1:
            raise AdapterMismatch("max_adapters must be at least 1")
        self.adapter_dir = adapter_dir
        self.max_adapters = max_adapters
        self.weight_step = weight_step
        self._load, self._unload = load, unload
        self._lock = threading.Lock()  # the live view and the registry
        self._io_lock = threading.RLock()  # loading and unloading adapters (server and disk)
        self.view = Live(shards=None, active=frozenset())
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._leaving: list[tuple[str, _Loaded]] = []  # retired, still in use

    # -- the live view ----------------------------------------------------------------------------
    def swap(self, expected: tuple[ShardAdapter, ...] | None, shards: tuple[ShardAdapter, ...],
             active: frozenset[int] | None = None) -> bool:
        """Switch to ``shards`` if the live shards are still ``expected`` (keeping the quarantine unless
        ``active`` is given) and retire every adapter holding a version no longer live."""
        versions = {(s.ref.shard, s.ref.version) for s in shards}
        with self._lock:
            if self.view.shards is not expected:
                return False
            self.view = Live(shards=shards, active=self.view.active if active is None else active)
            self._retire_where(lambda entry: not entry.versions <= versions)
        self.unload_idle()
        return True

    def quarantine(self, shard: int) -> None:
        with self._lock:
            self.view = Live(shards=self.view.shards, active=self.view.active - {shard})
            self._retire_where(lambda entry: any(s == shard for s, _ in entry.versions))
        self.unload_idle()

    def release(self, shard: int) -> None:
        with self._lock:
            self.view = Live(shards=self.view.shards, active=self.view.active | {shard})

    # -- the registry -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The adapters that may still be picked, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def retire_all(self) -> None:
        with self._lock:
            self._retire_where(lambda entry: True)
        self.unload_idle()

    def _retire_where(self, doomed: Callable[[_Loaded], bool]) -> None:  # lock held
        for name in [n for n, entry in self._loaded.items() if doomed(entry)]:
            entry = self._loaded.pop(name)
            entry.retired = True
            self._leaving.append((name, entry))

    def unload_idle(self) -> None:
        """Unload (and delete) retired adapters nobody uses any more."""
        with self._io_lock:
            with self._lock:  # a name loaded again since it retired stays (same tensors)
                idle = [(n, e) for n, e in self._leaving if e.users == 0 and n not in self._loaded]
                self._leaving = [(n, e) for n, e in self._leaving if e.users > 0 and n not in self._loaded]
            for name, entry in idle:
                self._unload(name)
                shutil.rmtree(entry.folder, ignore_errors=True)

    @contextmanager
    def use(self, weights: np.ndarray, mode: Mode) -> Iterator[str]:
        """The name of the loaded adapter of ``weights`` ([K], raw), held in use for the block."""
        entry, name = self._pick(weights, mode)
        try:
            yield name
        finally:
            with self._lock:
                entry.users -= 1
            self.unload_idle()

    def _use(self, name: str, live: Live) -> _Loaded | None:
        """The loaded adapter ``name``, marked in use, if ``live`` is still the live view (lock held)."""
        entry = self._loaded.get(name)
        if entry is None or self.view is not live:
            return None
        self._loaded.move_to_end(name)
        entry.users += 1
        return entry

    def _pick(self, weights: np.ndarray, mode: Mode) -> tuple[_Loaded, str]:
        for _ in range(8):  # the view changed while an adapter was being loaded: again, on the new view
            live = self.view
            if live.shards is None:
                raise AdapterMismatch("no adapters loaded")
            if weights.shape != (len(live.shards),):
                raise AdapterMismatch(f"weights shape {weights.shape} != ({len(live.shards)},)")
            effective = snap_weights(effective_weights(weights[None, :], live.active)[0],
                                     self.weight_step)  # [K], quarantined shards 0
            name = adapter_name(live.shards, effective, mode)
            with self._lock:
                entry = self._use(name, live)
            if entry is not None:
                return entry, name
            with self._io_lock:  # loads and unloads one at a time: a name is never unloaded under a new load
                with self._lock:
                    entry = self._use(name, live)
                if entry is not None:
                    return entry, name
                folder = write_merged(live.shards, effective, mode, self.adapter_dir)
                self._load(name, folder)
                used = frozenset((s.ref.shard, s.ref.version)
                                 for s, w in zip(live.shards, effective, strict=True) if w > 0)
                with self._lock:
                    entry = self._register(name, _Loaded(folder=folder, versions=used), live)
                self.unload_idle()
            if not entry.retired:
                return entry, name
        raise EngineUnavailable("the shards kept changing while an adapter was being loaded")

    def _register(self, name: str, entry: _Loaded, live: Live) -> _Loaded:  # lock held
        """Keep a freshly loaded adapter, in use, if the view it was built from is still live (else it may
        hold a shard quarantined meanwhile: retired, never used); evict past ``max_adapters``."""
        if self.view is not live:
            entry.retired = True
            self._leaving.append((name, entry))
            return entry
        self._loaded[name] = entry
        entry.users += 1
        while len(self._loaded) > self.max_adapters:
            old, evicted = self._loaded.popitem(last=False)
            evicted.retired = True
            self._leaving.append((old, evicted))
        return entry

