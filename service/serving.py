"""What one gateway replica serves: the engine's shard versions, the quarantine, the attention memory.

The ledger is the truth. ``sync()`` reads it and brings the replica in line: a new serving version
is loaded aside and switched in atomically (then its quarantine is lifted), a shard that is not
``serving`` is quarantined, and deleted validation samples leave the memory. It runs at start, on
every pub/sub event, and every ``poll_interval_s`` as the fallback. A deletion taken by this replica
quarantines its shards at once, before its transaction commits.
"""

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from apa import aggregation, artifacts
from apa.aggregation import ValidationMemory
from apa.engines import ENGINES, Engine
from apa.engines.base import AdapterRef
from apa.errors import ConfigError, LedgerError
from apa.ledger import catalog, deletions
from apa.ledger.db import session_scope
from apa.ledger.models import SERVING, as_utc, utcnow
from apa.model import BaseModel
from apa.runs import RunConfig, memory_path
from service.deadline import Deadline
from service.history_cache import HistoryCache
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    path: Path
    config: RunConfig


@dataclass(frozen=True)
class Attention:
    """The validation memory and the attention used with it, replaced together."""

    memory: ValidationMemory
    setting: aggregation.Attention
    choice: aggregation.AttentionChoice | None  # None: too few validation samples to choose with


class Serving:
    def __init__(self, settings: ServiceSettings, base: BaseModel, run: RunInfo) -> None:
        self.settings, self.base, self.run = settings, base, run
        self.engine: Engine = ENGINES[settings.engine](base, **settings.engine_options())
        self.attention: Attention | None = None
        self.histories = HistoryCache(settings.history_cache_size)
        self._valid_ids: frozenset[str] = frozenset()
        self._sync_lock = threading.Lock()
        # A sync must never lift a quarantine it did not see: ``_epoch`` counts quarantines (a sync
        # releases nothing if one happened after its ledger read) and ``_pending`` holds the shards
        # of deletions this replica took whose transaction has not committed yet.
        self._state_lock = threading.Lock()
        self._epoch = 0
        self._pending: Counter[int] = Counter()
        self.on_completed: Callable[[list[float]], None] = lambda seconds: None  # DELETE -> completed, s
        self._completed_seen: datetime = utcnow()
        self.deadline = Deadline(settings.forget_policy())

    # -- keeping in line with the ledger ------------------------------------------------------
    def sync(self) -> None:
        with self._sync_lock:
            with self._state_lock:
                epoch = self._epoch
            with session_scope(self.settings.ledger_url, **self.settings.ledger_timeouts()) as session:
                views = catalog.shard_views(session=session)
                valid_ids = frozenset(catalog.live_sample_ids(session=session, split="valid"))
                finished = deletions.completed_since(session=session, since=self._completed_seen)
                completed = [(as_utc(r.created_at), as_utc(r.completed_at)) for r in finished]
                subjects = {r.subject_hmac for r in finished}
                open_created = deletions.open_deletions_created(session=session)
            self.deadline.update(open_created)
            if any(v.path is None for v in views):
                raise LedgerError(f"shards without a serving version: {[v.shard for v in views if v.path is None]}")
            refs = [AdapterRef(shard=v.shard, version=v.version or 0, path=v.path) for v in views if v.path]
            live = {s.shard: s.version for s in self.engine.live()}
            changed = [r for r in refs if live.get(r.shard) != r.version]
            serving = {v.shard for v in views if v.state == SERVING}
            for shard in {r.shard for r in refs} - serving:  # quarantine first: never serve deleted data
                self.engine.quarantine(shard)
            if changed or valid_ids != self._valid_ids or self.attention is None:
                self.attention = self._attend(self._memory(refs, valid_ids))
                self._valid_ids = valid_ids
            if not live:
                self.engine.load(refs)
                for shard in {r.shard for r in refs} - serving:
                    self.engine.quarantine(shard)
            elif changed:
                for ref in changed:
                    log.info("hot-swap shard %d: v%s -> v%d", ref.shard, live.get(ref.shard), ref.version)
                self.engine.load_shards(changed)
            with self._state_lock:
                if self._epoch == epoch:
                    for shard in serving - set(+self._pending):
                        self.engine.release(shard)
            if completed:
                self.forget_subjects(subjects)  # nothing deleted lingers
                self._completed_seen = max(done for _, done in completed if done is not None)
                self.on_completed([(done - created).total_seconds() for created, done in completed
                                   if done is not None and created is not None])

    def _memory(self, refs: Sequence[AdapterRef], valid_ids: frozenset[str]) -> ValidationMemory:
        predictions = [artifacts.read_json(ref.path / "valid_predictions.json") for ref in refs]
        memory = ValidationMemory.load(memory_path(self.run.path), predictions)
        return memory.without(set(memory.sample_ids) - valid_ids)

    def quarantine(self, shards: Sequence[int]) -> None:
        with self._state_lock:
            self._epoch += 1
            for shard in shards:
                self.engine.quarantine(shard)

    @contextmanager
    def quarantined_until_committed(self, shards: Sequence[int]) -> Iterator[None]:
        """Quarantine now; no sync may lift it while the deletion's transaction commits (inside)."""
        with self._state_lock:
            self._epoch += 1
            self._pending.update(shards)
            for shard in shards:
                self.engine.quarantine(shard)
        try:
            yield
        finally:
            with self._state_lock:
                self._pending.subtract(shards)

    def forget_user(self, user_id: str) -> None:
        """A user deleted data: drop what holds their history (the prefix cache is keyed by prompt text,
        not user, so all of it goes; deletions are rare)."""
        self.histories.forget(user_id)
        self.engine.prefixes.clear()

    def forget_subjects(self, subject_hmacs: set[str]) -> None:
        """``forget_user`` for users known by their HMAC (events and the ledger carry no user ids)."""
        self.histories.forget_subjects(subject_hmacs, self.settings.hmac_secret())
        self.engine.prefixes.clear()

    def _attend(self, memory: ValidationMemory) -> Attention:
        """Choose the attention on the (per-user) validation memory, leave one out; with too few
        samples to choose, the configured parts and the paper's for the rest."""
        grid = self.settings.attention_grid()
        try:
            choice = aggregation.choose_attention(memory, mode="per-user", grid=grid)
        except ConfigError as exc:
            paper = aggregation.PAPER
            fallback = aggregation.Attention(
                error=grid.errors[0] if len(grid.errors) == 1 else paper.error,
                knn=grid.knns[0] if len(grid.knns) == 1 else paper.knn,
                tau=grid.taus[0] if len(grid.taus) == 1 else paper.tau)
            log.warning("attention: %s; using %s", exc, fallback.label())
            return Attention(memory, fallback, None)
        log.info("attention %s (leave-one-out validation AUC %.4f, %d samples)", choice.attention.label(),
                 choice.valid_auc, choice.samples)
        return Attention(memory, choice.attention, choice)

    def drop_valid(self, sample_ids: Sequence[str]) -> None:
        attention = self.attention
        if attention is not None and sample_ids:
            self.attention = self._attend(attention.memory.without(set(sample_ids)))

    def on_event(self, event: dict[str, Any]) -> None:
        """A pub/sub event: apply a quarantine at once, then sync with the ledger."""
        if event.get("type") == "quarantine":
            self.quarantine([int(s) for s in event.get("shards", [])])
            if event.get("subject") is not None:  # the user's HMAC: events carry no user ids
                self.forget_subjects({str(event["subject"])})
        self.sync()

    # -- answering ------------------------------------------------------------------------------
    def active(self) -> dict[int, int]:
        """Active shard -> version."""
        return {s.shard: s.version for s in self.engine.live() if s.active}

    def weights(self, history_embedding: np.ndarray, active: dict[int, int]) -> np.ndarray:
        """Per-user APA weights over the K shards, zero for quarantined ones: [K]."""
        attention = self.attention
        k = self.run.config.shards
        mask = [s in active for s in range(k)]
        if attention is None or not attention.memory.sample_ids:  # no validation evidence: uniform over the active
            return np.array(mask, dtype=np.float64) / max(1, sum(mask))
        return aggregation.weights(attention.memory, history_embedding[None, :], mode="per-user",
                                   attention=attention.setting, active=mask)[0]


class EventListener(threading.Thread):
    """Redis pub/sub subscriber; reconnects after errors. Every message triggers ``serving.on_event``."""

    def __init__(self, redis: Any, channel: str, serving: Serving) -> None:
        super().__init__(name="events", daemon=True)
        self.redis, self.channel, self.serving = redis, channel, serving
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not self.stopped.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._handle(message["data"])
                pubsub.close()
            except Exception:
                log.warning("event listener: Redis unavailable; retrying in 2 s", exc_info=True)
                self.stopped.wait(2.0)

    def _handle(self, data: bytes) -> None:
        try:
            self.serving.on_event(json.loads(data))
        except Exception:  # the ledger poll retries what an event could not finish
            log.exception("event %r could not be applied", data[:200])

    def stop(self) -> None:
        self.stopped.set()


class LedgerPoller(threading.Thread):
    def __init__(self, serving: Serving, interval_s: float) -> None:
        super().__init__(name="ledger-poll", daemon=True)
        self.serving, self.interval_s = serving, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.serving.sync()
            except Exception:
                log.exception("ledger poll failed")

    def stop(self) -> None:
        self.stopped.set()
