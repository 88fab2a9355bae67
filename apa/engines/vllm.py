"""The vLLM engine: a client of a vLLM OpenAI-compatible server (``scripts/vllm-serve.sh``).

vLLM serves one LoRA per request, so each weight vector becomes one merged adapter (``merge.py``),
written under ``adapter_dir`` (a folder the server reads at the same path) and loaded at run time
through ``/v1/load_lora_adapter``. Scoring is one ``/v1/completions`` request per weight vector:
the prompts as token ids (tokenised here exactly as the torch engine does), one generated token,
``allowed_token_ids = [Yes, No]`` and the server started with ``--logprobs-mode processed_logprobs``,
so the two log-probabilities returned are those of Yes and No renormalised over the pair: p(yes) is
the softmax over the (Yes, No) logits, as ``apa.model.p_yes``.

Loaded adapters are kept in an LRU of ``max_adapters``; an adapter leaves it (and the server, and the
disk) when evicted, when a shard it contains is quarantined, or when a shard version it contains is
swapped out. One leaving while a request uses it is unloaded when that request ends. A quarantine
takes effect for every call that picks its adapter afterwards: registering an adapter re-checks the
live shards under the lock, so an adapter built from a view older than a quarantine is never used.
"""

import logging
import math
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from apa.engines.base import AdapterRef, Mode, ShardState, effective_weights
from apa.engines.merge import ShardAdapter, adapter_name, purge_merged, snap_weights, write_merged
from apa.errors import AdapterMismatch, EngineUnavailable
from apa.model import BaseModel, token_ids

log = logging.getLogger(__name__)

# Loading, unloading and cache resets answer at once on a live server; a quarantine (inside a DELETE)
# must not wait on a hung one for the scoring timeout. Scoring itself uses the client's timeout.
ADMIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Live:
    shards: tuple[ShardAdapter, ...] | None  # shard order 0..K-1
    active: frozenset[int]


@dataclass
class _Loaded:
    folder: Path
    versions: frozenset[tuple[int, int]]  # (shard, version) of every shard with weight in it
    users: int = 0  # requests using it now
    retired: bool = False  # never picked again; unloaded when its last user is done


@dataclass(frozen=True)
class _Pick:
    name: str
    loaded: _Loaded


@dataclass
class _Registry:
    loaded: OrderedDict[str, _Loaded] = field(default_factory=OrderedDict)  # least recently used first
    leaving: list[tuple[str, _Loaded]] = field(default_factory=list)  # retired, still in use


class VllmEngine:
    """The ``Engine`` protocol over a vLLM server (see module docstring)."""

    def __init__(self, base: BaseModel, *, url: str, adapter_dir: Path, max_adapters: int = 8,
                 weight_step: float = 0.0, timeout_s: float = 600.0, client: httpx.Client | None = None) -> None:
        """``base`` gives the tokenizer and the Yes/No ids (its weights are not used here).
        ``weight_step`` > 0 snaps each weight vector to that grid first (fewer distinct adapters; each
        weight moves by less than the step); 0 keeps them as they are."""
        if max_adapters < 1:
            raise AdapterMismatch("max_adapters must be at least 1")
        self.base = base
        self.adapter_dir = adapter_dir
        self.max_adapters = max_adapters
        self.weight_step = weight_step
        self._client = client or httpx.Client(base_url=url, timeout=timeout_s)
        self._lock = threading.Lock()  # the live view and the registry
        self._io_lock = threading.RLock()  # loading and unloading adapters (server and disk)
        self._live = _Live(shards=None, active=frozenset())
        self._registry = _Registry()

    # -- HTTP ----------------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any] | None, *, missing_ok: bool = False,
              timeout_s: float | None = None) -> Any:
        try:
            response = (self._client.post(path, json=body) if timeout_s is None
                        else self._client.post(path, json=body, timeout=timeout_s))
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"vLLM server at {self._client.base_url}: {exc}") from exc
        if missing_ok and response.status_code == 404:
            log.warning("vLLM server has no %s (start it with VLLM_SERVER_DEV_MODE=1)", path)
            return None
        if response.status_code >= 400:
            raise EngineUnavailable(f"vLLM {path}: {response.status_code} {response.text[:300]}")
        return response.json() if response.headers.get("content-type", "").startswith("application/json") else None

    # -- shards --------------------------------------------------------------------------------
    def _swap(self, expected: tuple[ShardAdapter, ...] | None, shards: tuple[ShardAdapter, ...],
              active: frozenset[int] | None = None) -> bool:
        """Switch to ``shards`` if the live shards are still ``expected`` (keeping the quarantine unless
        ``active`` is given) and retire every adapter holding a version no longer live."""
        versions = {(s.ref.shard, s.ref.version) for s in shards}
        with self._lock:
            if self._live.shards is not expected:
                return False
            self._live = _Live(shards=shards, active=self._live.active if active is None else active)
            self._retire_where(lambda entry: not entry.versions <= versions)
        self._unload_idle()
        return True

    def load(self, adapters: Sequence[AdapterRef]) -> None:
        refs = sorted(adapters, key=lambda a: a.shard)
        if [a.shard for a in refs] != list(range(len(refs))):
            raise AdapterMismatch(f"shards must be numbered 0..K-1, got {[a.shard for a in refs]}")
        shards = tuple(ShardAdapter.read(ref) for ref in refs)
        if len({(s.r, frozenset(s.modules)) for s in shards}) != 1:
            raise AdapterMismatch("every shard adapter must have the same rank and target modules")
        while not self._swap(self._live.shards, shards, frozenset(s.ref.shard for s in shards)):
            pass
        stale = purge_merged(self.adapter_dir, {s.sha256 for s in shards})  # left on disk by an earlier start
        if stale:
            log.info("deleted %d merged adapters of versions no longer live", len(stale))

    def load_shard(self, adapter: AdapterRef) -> None:
        self.load_shards([adapter])

    def load_shards(self, adapters: Sequence[AdapterRef]) -> None:
        """Read the new versions aside, then switch (again on the newer view if another swap won)."""
        new: dict[int, ShardAdapter] | None = None
        while True:
            live = self._live
            k = len(live.shards) if live.shards is not None else 0
            bad = [a.shard for a in adapters if not 0 <= a.shard < k]
            if live.shards is None or bad:
                raise AdapterMismatch(f"no shard {bad or [a.shard for a in adapters]} to swap; load all shards first")
            if new is None:
                new = {a.shard: ShardAdapter.read(a) for a in adapters}
            shards = tuple(new.get(s.ref.shard, s) for s in live.shards)
            if len({(s.r, frozenset(s.modules)) for s in shards}) != 1:
                raise AdapterMismatch("every shard adapter must have the same rank and target modules")
            if self._swap(live.shards, shards):
                return

    def quarantine(self, shard: int) -> None:
        with self._lock:
            self._live = _Live(shards=self._live.shards, active=self._live.active - {shard})
            self._retire_where(lambda entry: any(s == shard for s, _ in entry.versions))
        self._unload_idle()

    def release(self, shard: int) -> None:
        with self._lock:
            self._live = _Live(shards=self._live.shards, active=self._live.active | {shard})

    def live(self) -> list[ShardState]:
        live = self._live
        if live.shards is None:
            return []
        return [ShardState(shard=s.ref.shard, version=s.ref.version, active=s.ref.shard in live.active)
                for s in live.shards]

    def drop_cached(self) -> None:
        """Clear the server's prefix cache (``/reset_prefix_cache``, served with VLLM_SERVER_DEV_MODE=1).
        Best effort: a deletion must not fail because the server is down (a restarted server's cache is
        empty anyway); its blocks are keyed by adapter and token ids, and the deleted user's prompts
        are never sent again."""
        try:
            self._post("/reset_prefix_cache", None, missing_ok=True, timeout_s=ADMIN_TIMEOUT_S)
        except EngineUnavailable:
            log.warning("could not clear the vLLM server's prefix cache", exc_info=True)

    def cache_stats(self) -> dict[str, int]:
        """None here: the server's prefix-cache statistics are on vLLM's own ``/metrics``."""
        return {}

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters that may still be picked, least recently used first."""
        with self._lock:
            return list(self._registry.loaded)

    # -- the adapter registry (callers hold self._lock unless said) ----------------------------
    def _retire_where(self, doomed: Any) -> None:
        registry = self._registry
        for name in [n for n, entry in registry.loaded.items() if doomed(entry)]:
            entry = registry.loaded.pop(name)
            entry.retired = True
            registry.leaving.append((name, entry))

    def _unload_idle(self) -> None:
        """Unload (and delete) retired adapters nobody uses any more; takes the locks itself."""
        with self._io_lock:
            with self._lock:
                loaded = self._registry.loaded  # a name loaded again since it retired stays (same tensors)
                idle = [(n, e) for n, e in self._registry.leaving if e.users == 0 and n not in loaded]
                self._registry.leaving = [(n, e) for n, e in self._registry.leaving
                                          if e.users > 0 and n not in loaded]
            for name, entry in idle:
                try:
                    self._post("/v1/unload_lora_adapter", {"lora_name": name}, timeout_s=ADMIN_TIMEOUT_S)
                except EngineUnavailable:
                    log.warning("could not unload adapter %s from vLLM", name, exc_info=True)
                shutil.rmtree(entry.folder, ignore_errors=True)

    @contextmanager
    def _adapter(self, weights: np.ndarray, mode: Mode) -> Iterator[str]:
        """The name of the loaded adapter of ``weights`` ([K], raw), held in use for the block."""
        pick = self._pick(weights, mode)
        try:
            yield pick.name
        finally:
            with self._lock:
                pick.loaded.users -= 1
            self._unload_idle()

    def _use(self, name: str, live: _Live) -> _Loaded | None:
        """The loaded adapter ``name``, marked in use, if ``live`` is still the live view (lock held)."""
        entry = self._registry.loaded.get(name)
        if entry is None or self._live is not live:
            return None
        self._registry.loaded.move_to_end(name)
        entry.users += 1
        return entry

    def _pick(self, weights: np.ndarray, mode: Mode) -> _Pick:
        for _ in range(8):  # the view changed while an adapter was being loaded: again, on the new view
            live = self._live
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
                return _Pick(name, entry)
            with self._io_lock:  # loads and unloads one at a time: a name is never unloaded under a new load
                with self._lock:
                    entry = self._use(name, live)
                if entry is not None:
                    return _Pick(name, entry)
                folder = write_merged(live.shards, effective, mode, self.adapter_dir)
                self._load(name, folder)
                used = frozenset((s.ref.shard, s.ref.version)
                                 for s, w in zip(live.shards, effective, strict=True) if w > 0)
                with self._lock:
                    entry = _Loaded(folder=folder, versions=used)
                    if self._live is live:
                        self._registry.loaded[name] = entry
                        entry.users += 1
                        while len(self._registry.loaded) > self.max_adapters:
                            old, evicted = self._registry.loaded.popitem(last=False)
                            evicted.retired = True
                            self._registry.leaving.append((old, evicted))
                    else:  # may hold a shard quarantined meanwhile: never used
                        entry.retired = True
                        self._registry.leaving.append((name, entry))
                self._unload_idle()
            if not entry.retired:
                return _Pick(name, entry)
        raise EngineUnavailable("the shards kept changing while an adapter was being loaded")

    def _load(self, name: str, folder: Path) -> None:
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                       timeout_s=ADMIN_TIMEOUT_S)
        except EngineUnavailable as exc:
            if "already" not in str(exc):  # loaded before (another gateway): the same name is the same tensors
                raise

    # -- scoring -------------------------------------------------------------------------------
    def _p_yes(self, name: str, ids: list[list[int]]) -> np.ndarray:
        body = {"model": name, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "logprobs": 2,
                "allowed_token_ids": [self.base.yes_id, self.base.no_id], "return_tokens_as_token_ids": True}
        choices = sorted(self._post("/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(ids):
            raise EngineUnavailable(f"vLLM answered {len(choices)} choices for {len(ids)} prompts")
        yes, no = f"token_id:{self.base.yes_id}", f"token_id:{self.base.no_id}"
        out = np.empty(len(ids))
        for i, choice in enumerate(choices):
            top = choice["logprobs"]["top_logprobs"][0]
            if yes not in top or no not in top:
                raise EngineUnavailable(f"vLLM did not return both Yes and No log-probabilities: {sorted(top)}")
            out[i] = 1.0 / (1.0 + math.exp(top[no] - top[yes]))  # softmax over (Yes, No)
        return out

    def score(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
              batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt; one request per distinct weight row (vLLM batches inside it, so
        ``batch_size`` is not used)."""
        live = self._live
        k = len(live.shards) if live.shards is not None else 0
        if weights.shape != (len(prompts), k):
            raise AdapterMismatch(f"weights shape {weights.shape} != ({len(prompts)}, {k})")
        groups: dict[bytes, list[int]] = {}
        for i, row in enumerate(np.asarray(weights, dtype=np.float64)):
            groups.setdefault(row.tobytes(), []).append(i)
        out = np.empty(len(prompts))
        for index in groups.values():
            out[index] = self.score_shared([prompts[i] for i in index], weights[index[0]], mode=mode)
        return out

    def score_shared(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
                     batch_size: int = 8) -> np.ndarray:
        """p(yes) per prompt, all with the weight vector ``weights`` ([K]): one adapter, one request
        (the server's prefix cache computes the shared prefix once)."""
        if not prompts:
            return np.empty(0)
        ids = token_ids(self.base.tokenizer, prompts)
        with self._adapter(np.asarray(weights, dtype=np.float64), mode) as name:
            return self._p_yes(name, ids)

    def close(self) -> None:
        """Unload every adapter this engine loaded from the server, then close the connection."""
        with self._lock:
            for name, entry in list(self._registry.loaded.items()):
                entry.retired = True
                self._registry.leaving.append((name, entry))
            self._registry.loaded.clear()
        self._unload_idle()
        self._client.close()
