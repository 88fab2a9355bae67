"""Online learning in the ledger: ingestion requests, new interactions and samples, their shards, and the
catalog's items. What waits to be trained, and when, is ``backlog.py``.

An ingested sample's row carries what the run folder holds for the run's samples: its content, prompt
and history prompt, frozen at ingestion (a later retitle never changes them).

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger import common
from ledger.common import chunks, write_audit
from ledger.models import (
    IngestionRequest,
    Interaction,
    Item,
    Sample,
    SampleInteraction,
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
