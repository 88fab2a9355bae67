"""Purging deleted data once its retrain is live: the plan and its completion.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, or_, select
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


CERTIFIED_HASHES = ("new_manifest_sha256", "new_adapter_sha256")  # per shard; old versions: HMACs only


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


def finish_purge(*, session: Session, plan: PurgePlan, centre_members: int | None = None) -> None:
    """Delete the request's interaction and sample rows (ingested samples' prompt texts with them); mark
    superseded versions purged and forget their plain hashes. ``centre_members``: the semantic centres
    were recomputed from this many live training samples (None: the run has none); the certificate says so."""
    now = utcnow()
    paths = [str(p) for p in plan.superseded]
    purged: list[AdapterVersion] = []
    for chunk in chunks(paths):
        purged.extend(session.scalars(select(AdapterVersion).where(AdapterVersion.path.in_(chunk))))
    for version in purged:
        version.purged_at = now
    forget_plain_hashes(session=session, versions=purged)
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
    if request.certificate is not None:
        request.certificate = {**request.certificate, "centres_recomputed": centre_members is not None,
                               "centre_members": centre_members}
    write_audit(session=session, actor="worker", action="deletion.purged", subject=plan.request_id,
                detail={"interaction_rows": len(interaction_ids), "sample_rows": len(sample_ids),
                        "adapter_versions": len(paths)})



def forget_plain_hashes(*, session: Session, versions: Sequence[AdapterVersion]) -> None:
    """A purged version held deleted data: a plain hash of its manifest (or weights) would let anyone try
    each possible sample against it and find the deleted one. Its row keeps neither its manifest's sha256
    nor its metrics (the adapter's sha256), and every certificate and deletion record that named it as a
    new version forgets those hashes. Old versions are named by HMAC only from the start
    (``ledger.deletions.manifest_hmac``)."""
    digests = {d for v in versions for d in (v.manifest_sha256, v.metrics.get("adapter_sha256")) if d}
    named = {(v.shard, v.version) for v in versions}
    for version in versions:
        version.manifest_sha256, version.metrics = None, {}
    if not named:
        return
    parts = [p for p in session.scalars(select(DeletionShard).where(
        DeletionShard.shard.in_(sorted({k for k, _ in named})), DeletionShard.new_version.is_not(None)))
        if (p.shard, p.new_version) in named]
    for part in parts:
        part.new_manifest_sha256 = None
    for request_id in sorted({p.request_id for p in parts}):
        request = get_deletion(session=session, request_id=request_id)
        if request.certificate is None:
            continue
        shards = [{**entry, **{f: None for f in CERTIFIED_HASHES if entry.get(f) in digests}}
                  for entry in request.certificate["shards"]]
        request.certificate = {**request.certificate, "shards": shards}  # a new object: JSON columns see it
