"""The vLLM engine: a client of a vLLM OpenAI-compatible server (``scripts/vllm-serve.sh``).

vLLM serves one LoRA per request, so each weight vector becomes one merged adapter (``merge.py``),
written under ``adapter_dir`` (a folder the server reads at the same path) and loaded at run time
through ``/v1/load_lora_adapter``. Scoring is one ``/v1/completions`` request per weight vector:
the prompts as token ids (tokenised here exactly as the torch engine does), one generated token,
``allowed_token_ids = [Yes, No]`` and the server started with ``--logprobs-mode processed_logprobs``,
so the two log-probabilities returned are those of Yes and No renormalised over the pair: p(yes) is
the softmax over the (Yes, No) logits, as ``apa.model.p_yes``.

Which adapters the server holds, and when one leaves, is ``vllm_adapters.py``'s bookkeeping.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from apa.engines.base import AdapterRef, Mode, ShardState
from apa.engines.merge import ShardAdapter, purge_merged
from apa.engines.vllm_adapters import Adapters
from apa.errors import AdapterMismatch, EngineUnavailable
from apa.model import BaseModel, token_ids

log = logging.getLogger(__name__)

# Loading, unloading and cache resets answer at once on a live server; a quarantine (inside a DELETE)
# must not wait on a hung one for the scoring timeout. Scoring itself uses the client's timeout.
ADMIN_TIMEOUT_S = 30.0


class VllmEngine:
    """The ``Engine`` protocol over a vLLM server (see module docstring)."""

    def __init__(self, base: BaseModel, *, url: str, adapter_dir: Path, max_adapters: int = 8,
                 weight_step: float = 0.0, timeout_s: float = 600.0, client: httpx.Client | None = None) -> None:
        """``base`` gives the tokenizer and the Yes/No ids (its weights are not used here).
        ``weight_step`` > 0 snaps each weight vector to that grid first (fewer distinct adapters; each
        weight moves by less than the step); 0 keeps them as they are."""
        self.base = base
        self.adapter_dir = adapter_dir
        self._adapters = Adapters(adapter_dir, max_adapters=max_adapters, weight_step=weight_step,
                                  load=self._load, unload=self._unload)
        self._client = client or httpx.Client(base_url=url, timeout=timeout_s)

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

    # -- shards ----------------------------------------------------------------------------------
    def load(self, adapters: Sequence[AdapterRef]) -> None:
        refs = sorted(adapters, key=lambda a: a.shard)
        if [a.shard for a in refs] != list(range(len(refs))):
            raise AdapterMismatch(f"shards must be numbered 0..K-1, got {[a.shard for a in refs]}")
        shards = tuple(ShardAdapter.read(ref) for ref in refs)
        if len({(s.r, frozenset(s.modules)) for s in shards}) != 1:
            raise AdapterMismatch("every shard adapter must have the same rank and target modules")
        while not self._adapters.swap(self._adapters.view.shards, shards, frozenset(s.ref.shard for s in shards)):
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
            live = self._adapters.view
            k = len(live.shards) if live.shards is not None else 0
            bad = [a.shard for a in adapters if not 0 <= a.shard < k]
            if live.shards is None or bad:
                raise AdapterMismatch(f"no shard {bad or [a.shard for a in adapters]} to swap; load all shards first")
            if new is None:
                new = {a.shard: ShardAdapter.read(a) for a in adapters}
            shards = tuple(new.get(s.ref.shard, s) for s in live.shards)
            if len({(s.r, frozenset(s.modules)) for s in shards}) != 1:
                raise AdapterMismatch("every shard adapter must have the same rank and target modules")
            if self._adapters.swap(live.shards, shards):
                return

    def quarantine(self, shard: int) -> None:
        self._adapters.quarantine(shard)

    def release(self, shard: int) -> None:
        self._adapters.release(shard)

    def live(self) -> list[ShardState]:
        live = self._adapters.view
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
        return self._adapters.names()

    # -- the server's adapters ------------------------------------------------------------------
    def _load(self, name: str, folder: Path) -> None:
        try:
            self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                       timeout_s=ADMIN_TIMEOUT_S)
        except EngineUnavailable as exc:
            if "already" not in str(exc):  # loaded before (another gateway): the same name is the same tensors
                raise

    def _unload(self, name: str) -> None:
        try:
            self._post("/v1/unload_lora_adapter", {"lora_name": name}, timeout_s=ADMIN_TIMEOUT_S)
        except EngineUnavailable:
            log.warning("could not unload adapter %s from vLLM", name, exc_info=True)

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
        live = self._adapters.view
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
        with self._adapters.use(np.asarray(weights, dtype=np.float64), mode) as name:
            return self._p_yes(name, ids)

    def close(self) -> None:
        """Unload every adapter this engine loaded from the server, then close the connection."""
        self._adapters.retire_all()
        self._client.close()
