"""Retraining a shard: dirty shards, snapshots, publishing a version, failures, admin retries.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ledger import backlog
from ledger.catalog import live_sample_ids
from ledger.common import record_event, version_row, write_audit
from ledger.deletions import complete
from ledger.errors import NothingToRetrain, ShardNotFound
from ledger.models import (
    COMPLETED,
    FAILED,
    QUARANTINED,
    RETRAINING,
    SERVING,
    AdapterVersion,
    DeletionRequest,
    DeletionShard,
    Shard,
    utcnow,
)
from ledger.run_import import VersionRecord, get_run


@dataclass(frozen=True)
class RetrainSnapshot:
    shard: int
    seq: int
    sample_ids: list[str]  # the shard's live training samples
    valid_ids: list[str]  # live validation samples
    old_version: int | None
    run_path: Path
    # the ingested samples among them (train and valid): the run folder knows nothing of these
    ingested: list[backlog.IngestedRecord] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)  # its pending samples, trained once it publishes


def dirty_shards(*, session: Session, include_failed: bool = False) -> list[int]:
    query = select(Shard.shard).where(Shard.dirty_seq > Shard.clean_seq)
    if not include_failed:
        query = query.where(Shard.state != FAILED)
    return sorted(session.scalars(query))


def begin_retrain(*, session: Session, shard: int) -> RetrainSnapshot | None:
    """Snapshot a shard's live samples and claim its pending ones, when it is dirty (a deletion) or holds
    samples no version has trained on (ingestion). A deletion marks the shard (and the requests it
    covers) ``retraining``; a retrain for ingested data alone keeps the shard serving its old version,
    and gives way while any deletion waits for a retrain (it is due again after it)."""
    row = session.get(Shard, shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {shard}")
    if row.state == FAILED:
        return None
    if not row.dirty and (shard not in backlog.pending(session=session) or backlog.deletions_open(session=session)):
        return None
    if row.dirty:
        row.state = RETRAINING
    for request in pending_requests(session=session, shard=shard, up_to=row.dirty_seq):
        if request.status == QUARANTINED:
            record_event(session=session, request=request, status=RETRAINING, detail=f"shard {shard}")
    claimed = backlog.claim(session=session, shard=shard)
    write_audit(session=session, actor="worker", action="shard.retrain.start", subject=f"shard-{shard}",
                detail={"seq": row.dirty_seq, "pending_samples": len(claimed)})
    sample_ids = live_sample_ids(session=session, split="train", shard=shard)
    valid_ids = live_sample_ids(session=session, split="valid")
    return RetrainSnapshot(shard=shard, seq=row.dirty_seq, sample_ids=sample_ids, valid_ids=valid_ids,
                           old_version=row.serving_version, run_path=Path(get_run(session=session).path),
                           ingested=backlog.records(session=session, sample_ids=[*sample_ids, *valid_ids]),
                           claimed=claimed)


def pending_requests(*, session: Session, shard: int, up_to: int | None = None) -> list[DeletionRequest]:
    query = (select(DeletionRequest).join(DeletionShard, DeletionShard.request_id == DeletionRequest.id)
             .where(DeletionShard.shard == shard, DeletionShard.done_at.is_(None)))
    if up_to is not None:
        query = query.where(DeletionShard.seq <= up_to)
    return list(session.scalars(query.order_by(DeletionRequest.created_at)))


def publish_version(
    *, session: Session, snapshot: RetrainSnapshot, record: VersionRecord, key: bytes,
) -> list[str]:
    """Make a retrained version the shard's serving version; complete the requests it covers.

    The shard serves again only if no deletion reached it since the snapshot; otherwise it stays
    quarantined (and another retrain follows). A snapshot older than the last published one is stale: its
    version is recorded retired and nothing else changes. Returns the ids of the requests completed.
    """
    row = session.get(Shard, snapshot.shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {snapshot.shard}")
    now = utcnow()
    if snapshot.seq < row.clean_seq:
        # A newer retrain published first (this worker stalled and lost its lock): its version may hold
        # data deleted since its snapshot. Record it, retired, so a purge finds its folder; never serve it.
        session.add(AdapterVersion(shard=record.shard, version=record.version, path=str(record.path.resolve()),
                                   manifest_sha256=record.manifest_sha256, n_samples=record.n_samples,
                                   metrics=record.metrics, covers_seq=snapshot.seq, retired_at=now))
        write_audit(session=session, actor="worker", action="shard.publish.stale", subject=f"shard-{row.shard}",
                    detail={"version": record.version, "seq": snapshot.seq, "clean_seq": row.clean_seq})
        return []
    old = version_row(session=session, shard=row.shard, version=row.serving_version)
    if old is not None:
        old.retired_at = now
    session.add(AdapterVersion(shard=record.shard, version=record.version, path=str(record.path.resolve()),
                               manifest_sha256=record.manifest_sha256, n_samples=record.n_samples,
                               metrics=record.metrics, covers_seq=snapshot.seq, served_at=now))
    row.serving_version = record.version
    row.clean_seq = max(row.clean_seq, snapshot.seq)
    row.state = QUARANTINED if row.dirty else SERVING
    row.ingest_error = None
    backlog.mark_trained(session=session, sample_ids=snapshot.claimed, version=record.version)
    session.flush()
    completed = []
    touched = session.scalars(select(DeletionShard).where(DeletionShard.shard == row.shard,
                                                          DeletionShard.done_at.is_(None),
                                                          DeletionShard.seq <= snapshot.seq))
    for part in touched:
        part.new_version, part.new_manifest_sha256, part.done_at = record.version, record.manifest_sha256, now
    session.flush()
    for request in _requests_ready(session=session):
        complete(session=session, request=request, key=key)
        if request.status == COMPLETED:
            completed.append(request.id)
    write_audit(session=session, actor="worker", action="shard.publish", subject=f"shard-{row.shard}",
                detail={"version": record.version, "state": row.state})  # its hash is in adapter_versions
    return completed


def _requests_ready(*, session: Session) -> list[DeletionRequest]:
    """Open requests whose every shard has been retrained."""
    open_requests = session.scalars(select(DeletionRequest).where(
        DeletionRequest.status.in_([QUARANTINED, RETRAINING, FAILED]), DeletionRequest.completed_at.is_(None)))
    ready = []
    for request in open_requests:
        parts = session.scalars(select(DeletionShard).where(DeletionShard.request_id == request.id)).all()
        if parts and all(p.done_at is not None for p in parts):
            ready.append(request)
    return ready


def fail_retrain(*, session: Session, shard: int, error: str) -> list[str]:
    """The shard stays out of serving (never rolled back); its open requests become ``failed``."""
    row = session.get(Shard, shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {shard}")
    backlog.release_claims(session=session, shard=shard)
    if not row.dirty:
        # a retrain for ingested data alone: the serving version holds no deleted data and stays; the
        # shard's ingestion triggers wait for an admin's retry
        row.ingest_error = error[:2000]
        write_audit(session=session, actor="worker", action="shard.ingest.failed", subject=f"shard-{shard}",
                    detail={"error": error[:500]})
        return []
    row.state = FAILED
    failed = []
    for request in pending_requests(session=session, shard=shard):
        request.error = f"shard {shard}: {error}"
        record_event(session=session, request=request, status=FAILED, detail=request.error)
        failed.append(request.id)
    write_audit(session=session, actor="worker", action="shard.retrain.failed", subject=f"shard-{shard}",
                detail={"error": error[:500]})
    return failed


def request_retrain(*, session: Session, shard: int, actor: str = "admin") -> None:
    """Let the worker try a dirty (e.g. failed) shard again, or train its pending samples now."""
    row = session.get(Shard, shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {shard}")
    if not row.dirty and shard not in backlog.pending(session=session):
        raise NothingToRetrain(f"shard {shard} holds neither deleted data nor pending samples; nothing to retrain")
    row.ingest_error = None
    if row.state == FAILED:
        row.state = QUARANTINED
        for request in pending_requests(session=session, shard=shard):
            if request.status == FAILED:
                request.error = None
                record_event(session=session, request=request, status=QUARANTINED, detail="retry requested")
    write_audit(session=session, actor=actor, action="shard.retrain.request", subject=f"shard-{shard}")
