"""What the ledger's subject modules share: chunked IN-lists, the audit log, status events, version rows.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.models import (
    AdapterVersion,
    AuditEntry,
    DeletionEvent,
    DeletionRequest,
)

IDEMPOTENCY_WINDOW = timedelta(hours=24)
_CHUNK = 900  # stays under SQLite's bound-parameter limit


def chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


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
