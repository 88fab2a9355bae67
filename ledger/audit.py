"""``apa audit REQUEST_ID``: everything the ledger can say about one deletion, and nothing it deleted."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger.deletions import get_deletion, status_history
from ledger.models import AuditEntry, as_utc


def deletion_report(*, session: Session, request_id: str) -> dict[str, Any]:
    request = get_deletion(session=session, request_id=request_id)
    entries = session.scalars(select(AuditEntry).where(AuditEntry.subject == request_id).order_by(AuditEntry.id))
    return {
        "request_id": request.id,
        "status": request.status,
        "affected_shards": request.affected_shards,
        "created_at": as_utc(request.created_at),
        "completed_at": as_utc(request.completed_at),
        "purged_at": as_utc(request.purged_at),
        "error": request.error,
        "history": [{"status": e.status, "at": as_utc(e.at), "detail": e.detail}
                    for e in status_history(session=session, request_id=request_id)],
        "certificate": request.certificate,
        "audit_log": [{"at": as_utc(e.at), "actor": e.actor, "action": e.action, "detail": e.detail}
                      for e in entries],
    }
