"""The ingestion use case: new interactions → TALLRec samples → a split and a shard each, in one ledger
transaction; then this replica forgets the user's cached history, the others hear of it, and the
worker is woken where there is work.

The samples follow the run's own rules (``apa.samples.user_samples``: the up to ``max_history``
interactions before each new one, liked = rating above the threshold; none without ``min_history``
earlier ones). Samples the user already had keep their history (they are frozen; an interaction
back-dated between them changes only the new samples). A seeded hash of the sample id sends
``APA_INGEST_VALID_FRACTION`` of them to validation (``apa.samples.ingested_split``); the others join
a shard by the partition's rule (``apa.partition.assign``): at once for ``random`` and ``user``; a
``semantic`` run's wait for the worker, which embeds them off the serving path.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis import Redis
from sqlalchemy.orm import Session

from apa.partition import NEEDS_EMBEDDINGS, Incoming, assign
from apa.samples import ingested_split, user_samples
from jobs import queue
from ledger import backlog, catalog, common, ingest
from service.errors import InteractionKeyTooLong, ItemsNotFound
from service.ingest.schemas import IngestAccepted
from service.metrics import Metrics
from service.replica import Replica
from service.schemas import ID_MAX_LENGTH
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestionService:
    settings: ServiceSettings
    replica: Replica
    redis: Redis
    metrics: Metrics

    def accept(self, *, session: Session, user_id: str, interactions: Sequence[ingest.NewInteraction],
               token_hmac: str, idempotency_key: str | None) -> IngestAccepted:
        """Record the batch, all or nothing; a reused ``idempotency_key`` returns the first answer."""
        settings = self.settings
        common.lock_user(session=session, user_id=user_id)
        request, created = ingest.claim_request(session=session, user_id=user_id, key=settings.hmac_secret(),
                                                interactions=interactions, idempotency_key=idempotency_key,
                                                token_hmac=token_hmac)
        if not created:
            return IngestAccepted.model_validate(request.answer)
        unknown = ingest.unknown_items(session=session, item_ids=[i.item_id for i in interactions])
        if unknown:
            raise ItemsNotFound(unknown)
        longest = max(len(f"{user_id}:{i.item_id}:{i.timestamp or int(time.time())}") for i in interactions)
        if longest > ID_MAX_LENGTH:
            raise InteractionKeyTooLong(f"an interaction's key <user_id>:<item_id>:<timestamp> may hold at most "
                                        f"{ID_MAX_LENGTH} characters; this batch's longest holds {longest}")
        new, duplicates = self._new(session, user_id, interactions)
        samples = self._samples(session, user_id, new)
        shards = sorted({s.shard for s in samples if s.shard is not None})
        answer = IngestAccepted(accepted=len(new), duplicates=duplicates, pending_shards=shards,
                                samples={"train": sum(s.split == "train" for s in samples),  # type: ignore[arg-type]
                                         "valid": sum(s.split == "valid" for s in samples)})
        ingest.record(session=session, request=request, user_id=user_id, interactions=new, samples=samples,
                      answer=answer.model_dump())
        session.commit()
        self.replica.histories.discard(user_id)
        for what, n in (("accepted", answer.accepted), ("duplicates", duplicates),
                        ("train_samples", answer.samples.train), ("valid_samples", answer.samples.valid)):
            self.metrics.ingested.labels(what=what).inc(n)
        self._wake(session, request.subject_hmac, samples)
        return answer

    def _new(self, session: Session, user_id: str, interactions: Sequence[ingest.NewInteraction],
             ) -> tuple[list[ingest.NewInteraction], int]:
        """The batch less what the ledger holds already and repeats within it (the first one counts)."""
        now = int(time.time())
        batch = [i if i.timestamp is not None else ingest.NewInteraction(i.item_id, i.rating, now)
                 for i in interactions]
        known = ingest.existing_keys(session=session, keys=[i.key(user_id) for i in batch])
        new: dict[str, ingest.NewInteraction] = {}
        for item in batch:
            if item.key(user_id) not in known:
                new.setdefault(item.key(user_id), item)
        return list(new.values()), len(batch) - len(new)

    def _samples(self, session: Session, user_id: str, new: Sequence[ingest.NewInteraction],
                 ) -> list[ingest.NewSample]:
        cfg = self.replica.run.config
        fresh = {i.key(user_id) for i in new}
        merged = sorted([*ingest.timeline(session=session, user_id=user_id),
                         *((i.item_id, float(i.rating), int(i.timestamp or 0)) for i in new)],
                        key=lambda entry: (entry[2], entry[0]))
        positions = [p for p, (item, _, t) in enumerate(merged)
                     if p >= cfg.min_history and f"{user_id}:{item}:{t}" in fresh]
        built = user_samples(user_id, merged, positions, max_history=cfg.max_history,
                             like_threshold=cfg.like_threshold)
        if not built:
            return []
        titles = catalog.titles(session=session, item_ids=sorted({i for s in built
                                                                  for i in (*s.history_item_ids, s.target_item_id)}))
        splits = [ingested_split(s.sample_id, seed=cfg.seed, valid_fraction=self.settings.ingest_valid_fraction)
                  for s in built]
        train = [s for s, split in zip(built, splits, strict=True) if split == "train"]
        shard_of: dict[str, int] = {}
        if train and cfg.partition not in NEEDS_EMBEDDINGS:
            placed = assign(cfg.partition, Incoming(
                sample_ids=[s.sample_id for s in train], user_ids=[s.user_id for s in train], seed=cfg.seed,
                sizes=np.array(ingest.shard_sizes(session=session, shards=cfg.shards)),
                user_shards=ingest.user_shards(session=session, user_ids=[user_id])))
            shard_of = {s.sample_id: int(k) for s, k in zip(train, placed, strict=True)}
        return [ingest.NewSample(sample_id=s.sample_id, user_id=user_id, split=split, shard=shard_of.get(s.sample_id),
                                 label=s.label, content=s.content(), prompt=s.prompt(titles, noun=cfg.noun),
                                 history_prompt=s.history_prompt(titles, noun=cfg.noun),
                                 interaction_keys=s.interaction_keys)
                for s, split in zip(built, splits, strict=True)]

    def _wake(self, session: Session, subject_hmac: str, samples: Sequence[ingest.NewSample]) -> None:
        """Tell the other replicas (by the user's HMAC) and wake the worker where there is work: samples to
        place or to bring into the validation memory, shards whose retrain is now due. Without Redis the
        ledger poll and the worker's reconciler catch up."""
        settings = self.settings
        try:
            queue.publish(self.redis, settings.redis_prefix, {"type": "ingest", "subject": subject_hmac})
            if any(s.shard is None for s in samples):
                queue.enqueue_prepare(self.redis, settings.redis_prefix)
            if any(s.shard is not None for s in samples):
                due = backlog.due_shards(session=session, min_samples=settings.ingest_min_samples,
                                        max_delay_s=settings.ingest_max_delay_s)
                session.rollback()  # the read's transaction: nothing to keep
                for shard in due:
                    queue.enqueue_retrain(self.redis, settings, shard, queue.INGESTION)
        except Exception:
            log.warning("ingestion recorded, but Redis is unavailable: the worker's reconciler will pick it up",
                        exc_info=True)


def interactions_of(body: Any) -> list[ingest.NewInteraction]:
    """The request's batch as the ledger takes it (a missing timestamp stays None: the server's time)."""
    return [ingest.NewInteraction(item_id=i.item_id, rating=float(i.rating), timestamp=i.timestamp)
            for i in body.interactions]
