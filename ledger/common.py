"""What the ledger's subject modules share: chunked IN-lists, the audit log, status events, version rows.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

import hashlib
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from ledger.errors import IdempotencyConflict
from ledger.models import (
    AdapterVersion,
    AuditEntry,
    DeletionEvent,
    DeletionRequest,
    IngestionRequest,
    as_utc,
    utcnow,
)

Keyed = TypeVar("Keyed", DeletionRequest, IngestionRequest)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
_CHUNK = 900  # stays under SQLite's bound-parameter limit


def chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def find_idempotent(*, session: Session, model: type[Keyed], token_hmac: str, idempotency_key: str,
                    binding: str, conflict: str) -> Keyed | None:
    """The request of ``model`` this token made under this key in the last 24 h, if any.

    A key names one request: reused for another request it is refused (:class:`IdempotencyConflict`
    with ``conflict``), never matched. An expired key is released for reuse.
    """
    earlier = session.scalars(select(model).where(
        model.token_hmac == token_hmac, model.idempotency_key == idempotency_key)).first()
    if earlier is None:
        return None
    created = as_utc(earlier.created_at)
    if created is not None and created < utcnow() - IDEMPOTENCY_WINDOW:
        earlier.idempotency_key = None
        session.flush()
        return None
    if earlier.idempotency_hmac != binding:
        raise IdempotencyConflict(conflict)
    return earlier


def lock_user(*, session: Session, user_id: str) -> None:
    """Serialise the writers of one user's data (an ingestion builds samples on the user's history, a
    deletion tombstones it) until the transaction ends. PostgreSQL: a transaction-scoped advisory lock on
    a hash of the id; SQLite takes its one write lock at BEGIN already."""
    if session.get_bind().dialect.name == "postgresql":
        lock = int.from_bytes(hashlib.sha256(f"user:{user_id}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": lock})


def write_audit(*, session: Session, actor: str, action: str, subject: str,
                detail: dict[str, Any] | None = None) -> None:
    session.add(AuditEntry(actor=actor, action=action, subject=subject, detail=detail or {}))


def version_row(*, session: Session, shard: int, version: int | None) -> AdapterVersion | None:
    if version is None:
        return None
    return session.scalars(
        select(AdapterVersion).where(AdapterVersion.shard == shard, AdapterVersion.version == version)
    ).first()


def record_event(*, session: Session, request: DeletionRequest, status: str, detail: str | None = None) -> None:
    request.status = status
    session.add(DeletionEvent(request_id=request.id, status=status, detail=detail))
