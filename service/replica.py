"""What one gateway replica serves: the engine's shard versions, the quarantine, and what it keeps per user.

The ledger is the truth. ``sync()`` reads it and brings the replica in line: a new serving version
is loaded aside and switched in atomically (then its quarantine is lifted), a shard that is not
``serving`` is quarantined, deleted validation samples leave the attention memory, and the users of
deletions completed since the last sync are forgotten. It runs at start, on every pub/sub event and
every ``poll_interval_s`` (``service/background.py``). A deletion taken by this replica quarantines
its shards at once, before its transaction commits (``quarantined_until_committed``).

The replica talks to its engine through the ``Engine`` protocol only; ``apa.engines.create_engine``
builds the concrete one.
"""

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from apa.engines.base import AdapterRef, Engine
from apa.model import BaseModel
from apa.runs import RunConfig, memory_path
from ledger import catalog, deletions, ingest
from ledger.db import session_scope
from ledger.errors import LedgerError
from ledger.models import SERVING, as_utc, utcnow
from service.attention import Attention
from service.deadline import Deadline
from service.history_cache import HistoryCache
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    path: Path
    config: RunConfig


class Replica:
    def __init__(self, settings: ServiceSettings, base: BaseModel, run: RunInfo, engine: Engine) -> None:
        self.settings, self.base, self.run, self.engine = settings, base, run, engine
        self.attention = Attention(settings.attention_grid(), memory_path(run.path), run.config.shards)
        self.histories = HistoryCache(settings.history_cache_size)
        self.deadline = Deadline(settings.forget_policy())
        self.on_completed: Callable[[list[float]], None] = lambda seconds: None  # DELETE -> completed, s
        self._completed_seen: datetime = utcnow()
        self._ingested_seen: datetime = utcnow()
        self._sync_lock = threading.Lock()
        # A sync must never lift a quarantine it did not see: ``_epoch`` counts quarantines (a sync
        # releases nothing if one happened after its ledger read) and ``_pending`` holds the shards
        # of deletions this replica took whose transaction has not committed yet.
        self._state_lock = threading.Lock()
        self._epoch = 0
        self._pending: Counter[int] = Counter()

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
                ingested, newest = ingest.ingested_since(session=session, since=self._ingested_seen)
            self.deadline.update(open_created)
            if ingested:  # users whose history grew on another replica (the event may have been missed)
                self.histories.discard_subjects(ingested, self.settings.hmac_secret())
                self._ingested_seen = newest or self._ingested_seen
            if any(v.path is None for v in views):
                raise LedgerError(f"shards without a serving version: {[v.shard for v in views if v.path is None]}")
            refs = [AdapterRef(shard=v.shard, version=v.version or 0, path=v.path) for v in views if v.path]
            live = {s.shard: s.version for s in self.engine.live()}
            changed = [r for r in refs if live.get(r.shard) != r.version]
            serving = {v.shard for v in views if v.state == SERVING}
            for shard in {r.shard for r in refs} - serving:  # quarantine first: never serve deleted data
                self.engine.quarantine(shard)
            self.attention.refresh(refs, valid_ids, versions_changed=bool(changed))
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
        """A user deleted data: drop what holds their history (the engine's prompt caches are keyed by
        prompt text, not user, so all of them go; deletions are rare)."""
        self.histories.forget(user_id)
        self.engine.drop_cached()

    def forget_subjects(self, subject_hmacs: set[str]) -> None:
        """``forget_user`` for users known by their HMAC (events and the ledger carry no user ids)."""
        self.histories.forget_subjects(subject_hmacs, self.settings.hmac_secret())
        self.engine.drop_cached()

    def on_event(self, event: dict[str, Any]) -> None:
        """A pub/sub event: apply a quarantine at once, then sync with the ledger. An ingestion only drops
        the user's cached history (many a second: no sync each)."""
        if event.get("type") == "ingest":
            if event.get("subject") is not None:
                self.histories.discard_subjects({str(event["subject"])}, self.settings.hmac_secret())
            return
        if event.get("type") == "quarantine":
            self.quarantine([int(s) for s in event.get("shards", [])])
            if event.get("subject") is not None:  # the user's HMAC: events carry no user ids
                self.forget_subjects({str(event["subject"])})
        self.sync()

    # -- answering ------------------------------------------------------------------------------
    def active(self) -> dict[int, int]:
        """Active shard -> version."""
        return {s.shard: s.version for s in self.engine.live() if s.active}
