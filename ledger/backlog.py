"""The ingested samples waiting to be trained: their placement in a shard, when a shard's retrain is due,
and the claims a retrain takes on them.

A training sample is *pending* until a version of its shard trained on it. A semantic run's new training
samples wait for the worker to embed them (``shard`` is None until then); the other partitions place them
at once (``ingest.record``). Each function works inside the caller's session (one transaction); none
commits. Imports no torch.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ledger.common import chunks, write_audit
from ledger.models import FAILED, QUARANTINED, RETRAINING, DeletionRequest, DeletionShard, Sample, Shard, as_utc, utcnow


@dataclass(frozen=True)
class IngestedRecord:
    """What a retrain or the worker's preparation reads back of an ingested sample."""

    sample_id: str
    user_id: str
    split: str
    shard: int | None
    content: dict[str, Any]
    prompt: str
    history_prompt: str


@dataclass(frozen=True)
class Pending:
    shard: int
    samples: int
    oldest: datetime | None


def _pending_query():  # type: ignore[no-untyped-def]
    return select(Sample.shard, func.count(), func.min(Sample.ingested_at)).where(
        Sample.split == "train", Sample.ingested_at.is_not(None), Sample.trained_version.is_(None),
        Sample.deleted_at.is_(None), Sample.shard.is_not(None)).group_by(Sample.shard)


def pending(*, session: Session) -> dict[int, Pending]:
    """Per shard with any: its live training samples no version has trained on yet, and the oldest one's age."""
    return {int(k): Pending(shard=int(k), samples=int(n), oldest=as_utc(oldest))
            for k, n, oldest in session.execute(_pending_query()).all()}


def due_at(item: Pending, *, min_samples: int, max_delay_s: float) -> datetime | None:
    """When the shard's retrain is due: now once ``min_samples`` wait, else when the oldest is
    ``max_delay_s`` old."""
    if item.samples >= min_samples:
        return utcnow() if item.oldest is None else min(utcnow(), item.oldest)
    return None if item.oldest is None else item.oldest + timedelta(seconds=max_delay_s)


def due_shards(*, session: Session, min_samples: int, max_delay_s: float) -> list[int]:
    """Shards whose pending samples are due for a retrain (neither failed nor stopped by a failed retrain
    for ingested data, which waits for an admin)."""
    now = utcnow()
    held = set(session.scalars(select(Shard.shard).where((Shard.state == FAILED) | Shard.ingest_error.is_not(None))))
    return sorted(k for k, item in pending(session=session).items()
                  if k not in held and (at := due_at(item, min_samples=min_samples, max_delay_s=max_delay_s))
                  is not None and at <= now)


def deletions_open(*, session: Session) -> bool:
    """Whether a deletion still waits for a retrain (ingestion-only retrains give way to it)."""
    return session.scalars(select(DeletionShard.shard).join(DeletionRequest, DeletionRequest.id ==
                                                            DeletionShard.request_id)
                           .where(DeletionShard.done_at.is_(None),
                                  DeletionRequest.status.in_([QUARANTINED, RETRAINING])).limit(1)).first() is not None


def any_ingested(*, session: Session, live: bool = False) -> bool:
    query = select(Sample.sample_id).where(Sample.ingested_at.is_not(None))
    if live:
        query = query.where(Sample.deleted_at.is_(None))
    return session.scalars(query.limit(1)).first() is not None


def unplaced_count(*, session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Sample).where(
        Sample.ingested_at.is_not(None), Sample.deleted_at.is_(None), Sample.split == "train",
        Sample.shard.is_(None))) or 0)


def ingest_errors(*, session: Session) -> dict[int, str]:
    return {int(k): str(e) for k, e in session.execute(select(Shard.shard, Shard.ingest_error)
                                                       .where(Shard.ingest_error.is_not(None)))}


def records(*, session: Session, sample_ids: Sequence[str] | None = None, unprepared: bool = False,
            ) -> list[IngestedRecord]:
    """Live ingested samples: the given ones, or those the worker has still to prepare (a training sample
    without a shard, a validation sample not yet in the validation memory)."""
    query = select(Sample).where(Sample.ingested_at.is_not(None), Sample.deleted_at.is_(None))
    if unprepared:
        query = query.where(Sample.prepared_at.is_(None))
    found: list[Sample] = []
    if sample_ids is None:
        found = list(session.scalars(query.order_by(Sample.sample_id)))
    else:
        for chunk in chunks(sorted(set(sample_ids))):
            found.extend(session.scalars(query.where(Sample.sample_id.in_(chunk))))
    return [IngestedRecord(sample_id=s.sample_id, user_id=s.user_id, split=s.split, shard=s.shard,
                           content=dict(s.content or {}), prompt=s.prompt or "", history_prompt=s.history_prompt or "")
            for s in sorted(found, key=lambda s: s.sample_id)]


def train_members(*, session: Session) -> list[tuple[str, int]]:
    """(sample id, shard) of every live, placed training sample, run's and ingested."""
    return [(str(i), int(k or 0)) for i, k in session.execute(
        select(Sample.sample_id, Sample.shard).where(Sample.split == "train", Sample.deleted_at.is_(None),
                                                     Sample.shard.is_not(None)).order_by(Sample.sample_id))]


def place(*, session: Session, shards: dict[str, int], centres: list[list[float]] | None) -> int:
    """Give the worker's semantic assignment to still-unplaced live samples; store the centres it used.
    Returns how many were placed (a sample deleted meanwhile is skipped)."""
    now = utcnow()
    waiting: set[str] = set()
    for chunk in chunks(sorted(shards)):
        waiting.update(session.scalars(select(Sample.sample_id).where(
            Sample.sample_id.in_(chunk), Sample.shard.is_(None), Sample.deleted_at.is_(None)).with_for_update()))
    for sample_id in sorted(waiting):
        session.execute(update(Sample).where(Sample.sample_id == sample_id)
                        .values(shard=shards[sample_id], prepared_at=now))
    placed = len(waiting)
    if centres is not None:
        store_centres(session=session, centres=centres)
    if placed:
        write_audit(session=session, actor="worker", action="ingest.placed", subject="samples",
                    detail={"samples": placed, "shards": sorted(set(shards.values()))})
    return placed


def store_centres(*, session: Session, centres: list[list[float]]) -> None:
    """Each shard's semantic centre as last computed from its live members (placement, a deletion's purge)."""
    for row in session.scalars(select(Shard).order_by(Shard.shard)):
        if row.shard < len(centres):
            row.centre = [round(float(x), 6) for x in centres[row.shard]]


def mark_prepared(*, session: Session, sample_ids: Sequence[str]) -> None:
    now = utcnow()
    for chunk in chunks(sorted(set(sample_ids))):
        session.execute(update(Sample).where(Sample.sample_id.in_(chunk), Sample.prepared_at.is_(None))
                        .values(prepared_at=now))


def claim(*, session: Session, shard: int) -> list[str]:
    """A retrain snapshots the shard: its pending samples are claimed (a deletion of one now needs a retrain)."""
    ids = list(session.scalars(select(Sample.sample_id).where(
        Sample.shard == shard, Sample.split == "train", Sample.ingested_at.is_not(None),
        Sample.trained_version.is_(None), Sample.deleted_at.is_(None))))
    now = utcnow()
    for chunk in chunks(ids):
        session.execute(update(Sample).where(Sample.sample_id.in_(chunk), Sample.claimed_at.is_(None))
                        .values(claimed_at=now))
    return sorted(ids)


def mark_trained(*, session: Session, sample_ids: Sequence[str], version: int) -> None:
    """The published version trained on these samples (those still pending become trained)."""
    for chunk in chunks(sorted(set(sample_ids))):
        session.execute(update(Sample).where(
            Sample.sample_id.in_(chunk), Sample.ingested_at.is_not(None), Sample.trained_version.is_(None))
            .values(trained_version=version))


def release_claims(*, session: Session, shard: int) -> None:
    """A failed retrain trained nothing: its claims go (a deletion of those samples needs no retrain)."""
    session.execute(update(Sample).where(Sample.shard == shard, Sample.trained_version.is_(None),
                                         Sample.claimed_at.is_not(None)).values(claimed_at=None))


