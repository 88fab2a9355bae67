"""The torch engine: K shard LoRAs stacked per target module (``apa.engines.mixture``), mixed per
sample in one forward pass.

The stacks live in an immutable ``Stack``; the engine holds one reference to the live
(stack, active shards) pair and replaces it whole, so a swap or a quarantine is atomic for
concurrent callers and an in-flight call finishes on the tensors it started with. Outside ``score``
the model is exactly the base model (embeddings use it that way).
"""
import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from apa.engines.base import AdapterRef, Mode, ShardState, effective_weights
from apa.engines.mixture import MIXTURE, Mix, Stack, install_mixture, read_adapter
from apa.engines.prefix_cache import PrefixCache, PrefixKey
from apa.errors import AdapterMismatch
from apa.model import (
    BaseModel,
    PackedRow,
    forward_last_hidden,
    packed_last_hidden,
    score_hidden,
    shared_prefix_length,
    token_ids,
)


@dataclass(frozen=True)
class _Live:
    stack: Stack | None
    active: frozenset[int]


class TorchEngine:
    """One forward pass per batch, whatever K (see module docstring)."""

    def __init__(self, base: BaseModel, *, prefix_cache_bytes: int = 0) -> None:
        self.base = base
        self._lock = threading.Lock()
        self._live = _Live(stack=None, active=frozenset())
        self._wrapped: set[str] = set()
        self.prefixes = PrefixCache(prefix_cache_bytes)  # score_shared's prefixes across calls (0: off)

    def _drop_stale_prefixes(self) -> None:
        """After a swap: prefixes computed with versions no longer live go."""
        live = self._live
        versions = tuple((a.shard, a.version) for a in live.stack.adapters) if live.stack is not None else ()
        self.prefixes.drop(lambda key: key.versions != versions)

    # -- loading -------------------------------------------------------------------------------
    def _build(self, refs: Sequence[AdapterRef], reuse: Stack | None = None) -> Stack:
        """The stack of ``refs``; a (shard, version) that ``reuse`` already holds is sliced out of it
        instead of read again (its folder may be gone: a superseded version is purged once replaced)."""
        refs = sorted(refs, key=lambda a: a.shard)
        if [a.shard for a in refs] != list(range(len(refs))):
            raise AdapterMismatch(f"shards must be numbered 0..K-1, got {[a.shard for a in refs]}")
        held = {(a.shard, a.version): a.shard for a in reuse.adapters} if reuse is not None else {}
        device, dtype = self.base.device, next(self.base.model.parameters()).dtype
        blocks: list[tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []  # per shard: (r, modules)
        for ref in refs:
            if reuse is not None and (ref.shard, ref.version) in held:
                r, k = reuse.r, held[(ref.shard, ref.version)]
                blocks.append((r, {name: (a[k * r:(k + 1) * r], b[:, k * r:(k + 1) * r])  # [r, in], [out, r]
                                   for name, (a, b) in reuse.modules.items()}))
                continue
            config, modules = read_adapter(ref)
            blocks.append((int(config["r"]), {name: (a.to(device, dtype), b.to(device, dtype))
                                              for name, (a, b) in modules.items()}))
        ranks = {r for r, _ in blocks}
        names = {frozenset(mods) for _, mods in blocks}
        if len(ranks) != 1 or len(names) != 1:
            raise AdapterMismatch("every shard adapter must have the same rank and target modules")
        targets = sorted({n.rsplit(".", 1)[-1] for n in next(iter(names))})
        self._wrapped.update(install_mixture(self.base.model, targets))
        missing = next(iter(names)) - self._wrapped
        if missing:
            raise AdapterMismatch(f"adapter targets modules the base model lacks: {sorted(missing)[:3]}")
        modules = {}
        for name in next(iter(names)):
            a = torch.cat([mods[name][0] for _, mods in blocks], dim=0)  # [K*r, in]
            b = torch.cat([mods[name][1] for _, mods in blocks], dim=1)  # [out, K*r]
            modules[name] = (a, b)
        return Stack(adapters=tuple(refs), r=ranks.pop(), modules=modules)

    def load(self, adapters: Sequence[AdapterRef]) -> None:
        stack = self._build(adapters)
        with self._lock:
            self._live = _Live(stack=stack, active=frozenset(a.shard for a in stack.adapters))
        self._drop_stale_prefixes()

    def load_shard(self, adapter: AdapterRef) -> None:
        self.load_shards([adapter])

    def load_shards(self, adapters: Sequence[AdapterRef]) -> None:
        """Swap several shards' versions at once: build the new stack aside (no lock held while reading
        files; unchanged shards are reused from the live stack), then switch one reference."""
        while True:
            current = self._live
            k = len(current.stack.adapters) if current.stack is not None else 0
            bad = [a.shard for a in adapters if not 0 <= a.shard < k]
            if current.stack is None or bad:
                raise AdapterMismatch(f"no shard {bad or [a.shard for a in adapters]} to swap; load all shards first")
            new = {a.shard: a for a in adapters}
            stack = self._build([new.get(a.shard, a) for a in current.stack.adapters], reuse=current.stack)
            with self._lock:
                swapped = self._live.stack is current.stack  # nobody swapped meanwhile
                if swapped:
                    self._live = _Live(stack=stack, active=self._live.active)
            if swapped:
                self._drop_stale_prefixes()
                return

    def quarantine(self, shard: int) -> None:
        with self._lock:
            self._live = _Live(stack=self._live.stack, active=self._live.active - {shard})
        self.prefixes.drop(lambda key: shard < len(key.weights) and key.weights[shard] > 0)  # used the shard

    def release(self, shard: int) -> None:
        with self._lock:
            self._live = _Live(stack=self._live.stack, active=self._live.active | {shard})

    def live(self) -> list[ShardState]:
        live = self._live
        if live.stack is None:
            return []
        return [ShardState(shard=a.shard, version=a.version, active=a.shard in live.active)
                for a in live.stack.adapters]

    def drop_cached(self) -> None:
        self.prefixes.clear()

    def cache_stats(self) -> dict[str, int]:
        return asdict(self.prefixes.stats())

    def close(self) -> None:
        """Nothing outside this process to give back."""

    # -- scoring -------------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
              batch_size: int = 8, desc: str | None = None) -> np.ndarray:
        live = self._live  # one consistent (stack, quarantine) view for the whole call
        if live.stack is None:
            raise AdapterMismatch("no adapters loaded")
        if weights.shape != (len(prompts), len(live.stack.adapters)):
            raise AdapterMismatch(
                f"weights shape {weights.shape} != ({len(prompts)}, {len(live.stack.adapters)})"
            )
        w = torch.from_numpy(effective_weights(weights, live.active)).float()  # [n, K]
        stack = live.stack

        @contextlib.contextmanager
        def mixing(index: list[int]) -> Iterator[None]:
            token = MIXTURE.set(Mix(stack=stack, weights=w[index].to(self.base.device), mode=mode))
            try:
                yield
            finally:
                MIXTURE.reset(token)

        hidden = forward_last_hidden(self.base, prompts, batch_size=batch_size, desc=desc, around=mixing)
        return score_hidden(self.base, hidden).numpy()

    @torch.inference_mode()
    def score_shared(self, prompts: Sequence[str], weights: np.ndarray, *, mode: Mode = "nd",
                     batch_size: int = 8, desc: str | None = None) -> np.ndarray:
        """p(yes) per prompt for prompts scored with one weight vector ``weights`` ([K]), e.g. one user's
        candidates: their longest common token prefix runs once with the mixture active (or comes from
        the prefix cache), then the suffixes, ``batch_size`` at a time, packed into one row against its
        keys and values (``packed_last_hidden``). Equal to ``score`` (same tokens, same positions, same per-token
        mixture); the whole call uses one stack, whatever swaps meanwhile."""
        generation = self.prefixes.generation  # before the live view: see PrefixCache.put
        live = self._live
        if live.stack is None:
            raise AdapterMismatch("no adapters loaded")
        if weights.shape != (len(live.stack.adapters),):
            raise AdapterMismatch(f"weights shape {weights.shape} != ({len(live.stack.adapters)},)")
        if not prompts:
            return np.empty(0)
        w = torch.from_numpy(effective_weights(weights[None, :], live.active)).float()  # [1, K]
        w = w.to(self.base.device)
        stack, net, device = live.stack, self.base.model, self.base.device
        ids = token_ids(self.base.tokenizer, prompts)
        cut = shared_prefix_length(ids)

        key = PrefixKey(tokens=tuple(ids[0][:cut]), weights=tuple(float(x) for x in w[0]), mode=mode,
                        versions=tuple((a.shard, a.version) for a in stack.adapters))
        prefix = self.prefixes.get(key) if cut else None
        if cut and prefix is None:  # alone, so a cached prefix gives the same numbers to the last bit
            token = MIXTURE.set(Mix(stack=stack, weights=w, mode=mode))
            try:
                [(_, prefix)] = packed_last_hidden(net, [PackedRow(prefix=key.tokens, suffixes=[])], device)
            finally:
                MIXTURE.reset(token)
            self.prefixes.put(key, prefix, generation=generation)
        hidden = torch.empty(len(prompts), net.config.hidden_size, dtype=torch.float32)  # [n, hidden]
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None, unit="batch"):
            index = list(range(start, min(start + batch_size, len(prompts))))
            token = MIXTURE.set(Mix(stack=stack, weights=w, mode=mode))  # one row: the prompts are packed
            try:
                [(out, _)] = packed_last_hidden(
                    net, [PackedRow(prefix=key.tokens, suffixes=[ids[i][cut:] for i in index], cached=prefix)], device)
            finally:
                MIXTURE.reset(token)
            hidden[index] = out.float().cpu()
        return score_hidden(self.base, hidden).numpy()
