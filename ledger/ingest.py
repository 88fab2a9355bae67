"""Online learning in the ledger: ingestion requests, new interactions and samples, their shards, what is
pending, and when a shard's retrain is due.

An ingested sample's row carries what the run folder holds for the run's samples: its content, prompt
and history prompt, frozen at ingestion (a later retitle never changes them). A training sample is
*pending* until a version of its shard trained on it. A semantic run's new training samples wait for
the worker to embed them (``shard`` is None until then); the other partitions place them at once.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger import common
from ledger.common import chunks, write_audit
from ledger.models import (
    FAILED,
    QUARANTINED,
    RETRAINING,
    DeletionRequest,
    DeletionShard,
    IngestionRequest,
    Interaction,
    Item,
    Sample,
    SampleInteraction,
    Shard,
    as_utc,
    utcnow,
)


@dataclass(frozen=True)
class NewInteraction:
    item_id: str
    rating: float
    timestamp: int | None  # None: the server's time, filled in before it is recorded

    def key(self, user_id: str) -> str:
        return f"{user_id}:{self.item_id}:{self.timestamp}"


@dataclass(frozen=True)
class NewSample:
    """An ingested sample as the ledger records it (``content``: ``apa.samples.Sample.content()``)."""

    sample_id: str
    user_id: str
    split: str
    shard: int | None
    label: int
    content: dict[str, Any]
    prompt: str
    history_prompt: str
    interaction_keys: Sequence[str]


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


def idempotency_hmac(*, key: bytes, user_id: str, interactions: Sequence[NewInteraction]) -> str:
    """What an ingestion's Idempotency-Key binds: the user and the batch (an HMAC)."""
    batch = sorted([i.item_id, i.rating, -1 if i.timestamp is None else i.timestamp] for i in interactions)
    return hmac_hex(key, "idempotency-ingest", json.dumps({"user": user_id, "batch": batch}, separators=(",", ":")))


def claim_request(
    *, session: Session, user_id: str, key: bytes, interactions: Sequence[NewInteraction],
    idempotency_key: str | None, token_hmac: str | None,
) -> tuple[IngestionRequest, bool]:
    """The ingestion request's row (``created`` True), or the earlier one this token made under the same
    Idempotency-Key in the last 24 h (``created`` False; another batch under the key: 409)."""
    binding = None
    if idempotency_key and token_hmac:
        binding = idempotency_hmac(key=key, user_id=user_id, interactions=interactions)
        earlier = _find(session, token_hmac, idempotency_key, binding)
        if earlier is not None:
            return earlier, False
    request = IngestionRequest(id=uuid.uuid4().hex, subject_hmac=hmac_hex(key, "user", user_id),
                               idempotency_key=idempotency_key if binding else None, token_hmac=token_hmac,
                               idempotency_hmac=binding, answer={}, created_at=utcnow())
    try:
        with session.begin_nested():
            session.add(request)
            session.flush()
    except IntegrityError:
        if binding is None or token_hmac is None or idempotency_key is None:
            raise
        winner = _find(session, token_hmac, idempotency_key, binding)  # a concurrent twin committed first
        if winner is None:
            raise
        return winner, False
    return request, True


def _find(session: Session, token_hmac: str, idempotency_key: str, binding: str) -> IngestionRequest | None:
    return common.find_idempotent(
        session=session, model=IngestionRequest, token_hmac=token_hmac, idempotency_key=idempotency_key,
        binding=binding, conflict="this Idempotency-Key was used for another batch (another user or other "
                                  "interactions); use a new key for a new request")


def unknown_items(*, session: Session, item_ids: Sequence[str]) -> list[str]:
    wanted = sorted(set(item_ids))
    known: set[str] = set()
    for chunk in chunks(wanted):
        known.update(session.scalars(select(Item.item_id).where(Item.item_id.in_(chunk))))
    return [i for i in wanted if i not in known]


def timeline(*, session: Session, user_id: str) -> list[tuple[str, float, int]]:
    """The user's live interactions as (item_id, rating, timestamp), ordered by (timestamp, item_id)."""
    rows = session.execute(select(Interaction.item_id, Interaction.rating, Interaction.timestamp)
                           .where(Interaction.user_id == user_id, Interaction.deleted_at.is_(None))
                           .order_by(Interaction.timestamp, Interaction.item_id))
    return [(str(i), float(r), int(t)) for i, r, t in rows]


def existing_keys(*, session: Session, keys: Sequence[str]) -> set[str]:
    """Which interaction keys the ledger holds already (live, or deleted but not yet purged)."""
    found: set[str] = set()
    for chunk in chunks(sorted(set(keys))):
        found.update(session.scalars(select(Interaction.key).where(Interaction.key.in_(chunk))))
    return found


def shard_sizes(*, session: Session, shards: int) -> list[int]:
    """Live training samples per shard (pending ones included): what balance and load are counted on."""
    rows = dict(session.execute(select(Sample.shard, func.count()).where(
        Sample.split == "train", Sample.deleted_at.is_(None), Sample.shard.is_not(None)).group_by(Sample.shard)).all())
    return [int(rows.get(k, 0)) for k in range(shards)]


def user_shards(*, session: Session, user_ids: Sequence[str]) -> dict[str, int]:
    """Each user's shard: the one holding most of their live training samples (ties: the lower number)."""
    out: dict[str, int] = {}
    for chunk in chunks(sorted(set(user_ids))):
        rows = session.execute(select(Sample.user_id, Sample.shard, func.count()).where(
            Sample.user_id.in_(chunk), Sample.split == "train", Sample.deleted_at.is_(None),
            Sample.shard.is_not(None)).group_by(Sample.user_id, Sample.shard)).all()
        best: dict[str, tuple[int, int]] = {}  # user -> (-count, shard), the smallest wins
        for user, shard, n in rows:
            candidate = (-int(n), int(shard or 0))
            best[str(user)] = min(best.get(str(user), candidate), candidate)
        out.update({user: shard for user, (_, shard) in best.items()})
    return out


def record(
    *, session: Session, request: IngestionRequest, user_id: str, interactions: Sequence[NewInteraction],
    samples: Sequence[NewSample], answer: dict[str, Any],
) -> None:
    """Insert the new interactions and samples with their links; keep the answer with the request."""
    now = utcnow()
    rows = [{"key": i.key(user_id), "user_id": user_id, "item_id": i.item_id, "rating": float(i.rating),
             "timestamp": i.timestamp} for i in interactions]
    for chunk in chunks(rows):
        session.execute(insert(Interaction), list(chunk))
    keys = sorted({k for s in samples for k in s.interaction_keys})
    ids: dict[str, int] = {}
    for chunk in chunks(keys):
        ids.update((str(k), int(i)) for k, i in session.execute(
            select(Interaction.key, Interaction.id).where(Interaction.key.in_(chunk))))
    sample_rows = [{"sample_id": s.sample_id, "user_id": s.user_id, "split": s.split, "shard": s.shard,
                    "label": s.label, "ingested_at": now, "content": s.content, "prompt": s.prompt,
                    "history_prompt": s.history_prompt,
                    "prepared_at": now if s.split == "train" and s.shard is not None else None}
                   for s in samples]
    for chunk in chunks(sample_rows):
        session.execute(insert(Sample), list(chunk))
    links = [{"sample_id": s.sample_id, "interaction_id": ids[k]} for s in samples for k in s.interaction_keys]
    for chunk in chunks(links):
        session.execute(insert(SampleInteraction), list(chunk))
    request.answer = answer
    write_audit(session=session, actor="api", action="ingest", subject=request.id,
                detail={k: answer[k] for k in ("accepted", "duplicates", "samples", "pending_shards")})


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


def ingested_since(*, session: Session, since: datetime) -> tuple[set[str], datetime | None]:
    """The users (by HMAC) of ingestions after ``since``, and the newest one's time."""
    rows = session.execute(select(IngestionRequest.subject_hmac, IngestionRequest.created_at)
                           .where(IngestionRequest.created_at > since)).all()
    times = [at for at in (as_utc(at) for _, at in rows) if at is not None]
    newest = max(times, default=None)
    return {str(subject) for subject, _ in rows}, newest


def put_item(*, session: Session, item_id: str, title: str, actor: str = "admin") -> bool:
    """Add or retitle a catalog item; returns whether it was added. Trained prompts never change (they are
    frozen in the run folder and the ledger); new samples and ``/recommend`` use the new title."""
    item = session.get(Item, item_id, with_for_update=True)
    if item is None:
        session.add(Item(item_id=item_id, title=title))
        write_audit(session=session, actor=actor, action="item.add", subject=f"item-{item_id}"[:256])
        return True
    if item.title != title:
        item.title = title
        write_audit(session=session, actor=actor, action="item.retitle", subject=f"item-{item_id}"[:256])
    return False
