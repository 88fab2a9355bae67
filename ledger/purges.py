"""Purging deleted data once its retrain is live: the plan and its completion.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from ledger.common import chunks, write_audit
from ledger.deletions import get_deletion
from ledger.models import (
    COMPLETED,
    AdapterVersion,
    DeletionRequest,
    DeletionShard,
    Interaction,
    Sample,
    SampleInteraction,
    utcnow,
)
from ledger.run_import import get_run


@dataclass(frozen=True)
class PurgePlan:
    request_id: str
    sample_ids: list[str]
    superseded: list[Path]  # version folders trained on the deleted data
    run_path: Path
    interaction_hmacs: list[str]
    prompts: list[str] = field(default_factory=list)  # ingested samples' texts: their embedding-cache entries go


def pending_purges(*, session: Session) -> list[str]:
    return list(session.scalars(select(DeletionRequest.id).where(
        DeletionRequest.status == COMPLETED, DeletionRequest.purged_at.is_(None)).order_by(DeletionRequest.created_at)))


def purge_plan(*, session: Session, request_id: str) -> PurgePlan:
    request = get_deletion(session=session, request_id=request_id)
    parts = session.scalars(select(DeletionShard).where(DeletionShard.request_id == request.id)).all()
    superseded: list[Path] = []
    for part in parts:
        # trained on the deleted data: older than the version that forgot it, or snapshot before the
        # deletion whatever its number (a stalled retrain published late, recorded retired)
        stale = session.scalars(select(AdapterVersion).where(
            AdapterVersion.shard == part.shard, AdapterVersion.purged_at.is_(None),
            or_(AdapterVersion.version < (part.new_version or 0), AdapterVersion.covers_seq < part.seq)))
        superseded.extend(Path(v.path) for v in stale)
    rows = session.execute(select(Sample.sample_id, Sample.prompt, Sample.history_prompt)
                           .where(Sample.deletion_id == request.id)).all()
    return PurgePlan(request_id=request.id, sample_ids=sorted(str(i) for i, _, _ in rows),
                     superseded=sorted(set(superseded)), run_path=Path(get_run(session=session).path),
                     interaction_hmacs=list(request.deleted_hmacs),
                     prompts=sorted({text for _, *texts in rows for text in texts if text}))


def finish_purge(*, session: Session, plan: PurgePlan) -> None:
    """Delete the request's interaction and sample rows (ingested samples' prompt texts with them); mark
    superseded versions purged."""
    now = utcnow()
    paths = [str(p) for p in plan.superseded]
    for chunk in chunks(paths):
        session.execute(update(AdapterVersion).where(AdapterVersion.path.in_(chunk)).values(purged_at=now))
    sample_ids = list(session.scalars(select(Sample.sample_id).where(Sample.deletion_id == plan.request_id)))
    for chunk in chunks(sample_ids):
        session.execute(delete(SampleInteraction).where(SampleInteraction.sample_id.in_(chunk)))
        session.execute(delete(Sample).where(Sample.sample_id.in_(chunk)))
    interaction_ids = list(session.scalars(select(Interaction.id).where(Interaction.deletion_id == plan.request_id)))
    for chunk in chunks(interaction_ids):
        session.execute(delete(SampleInteraction).where(SampleInteraction.interaction_id.in_(chunk)))
        session.execute(delete(Interaction).where(Interaction.id.in_(chunk)))
    request = get_deletion(session=session, request_id=plan.request_id)
    request.purged_at = now
    write_audit(session=session, actor="worker", action="deletion.purged", subject=plan.request_id,
                detail={"interaction_rows": len(interaction_ids), "sample_rows": len(sample_ids),
                        "adapter_versions": len(paths)})
