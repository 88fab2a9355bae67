"""Everything the gateway, the worker and the CLI ask of the ledger, as keyword-only functions.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apa.errors import (
    DeletionNotFound,
    IdempotencyConflict,
    LedgerError,
    NothingToRetrain,
    ShardNotFound,
    UserNotFound,
)
from apa.ledger.models import (
    COMPLETED,
    FAILED,
    QUARANTINED,
    RETRAINING,
    SERVING,
    AdapterVersion,
    AuditEntry,
    DeletionEvent,
    DeletionRequest,
    DeletionShard,
    Forgotten,
    Interaction,
    Item,
    Run,
    Sample,
    SampleInteraction,
    Shard,
    utcnow,
)

if TYPE_CHECKING:  # types only: apa.data reaches the model-conversion code
    from apa.data import Dataset
    from apa.samples import Sample as TrainingSample

IDEMPOTENCY_WINDOW = timedelta(hours=24)
_CHUNK = 900  # stays under SQLite's bound-parameter limit


def hmac_hex(key: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256 of ``<kind>:<value>``: how deleted data is identified afterwards."""
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every time in the ledger is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start:start + _CHUNK]


def audit(*, session: Session, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None) -> None:
    session.add(AuditEntry(actor=actor, action=action, subject=subject, detail=detail or {}))


# -- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionRecord:
    shard: int
    version: int
    path: Path
    manifest_sha256: str
    n_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportSummary:
    created: bool
    interactions: int
    samples: int
    skipped_forgotten: int
    versions_added: int


def get_run(*, session: Session) -> Run:
    run = session.scalars(select(Run)).first()
    if run is None:
        raise LedgerError("the ledger holds no run: train one (`apa train`) or `apa ledger import RUN_DIR`")
    return run


def import_run(
    *, session: Session, run_path: Path, dataset: "Dataset", splits: "dict[str, list[TrainingSample]]",
    shard_of: dict[str, int], config: dict[str, Any], base_model_name: str, base_model_sha256: str,
    versions: Sequence[VersionRecord], key: bytes, forgotten: set[str] | None = None,
) -> ImportSummary:
    """Record a run: its dataset, samples, shards and adapter versions. Safe to run again (adds new versions).

    Interactions whose HMAC is in the ledger's ``forgotten`` table or in ``forgotten`` (the run
    folder's own list) are not brought back, nor any sample that contains one.
    """
    run_path = run_path.resolve()
    existing = session.scalars(select(Run)).first()
    if existing is not None and Path(existing.path) != run_path:
        raise LedgerError(f"this ledger already serves the run {existing.path}; use another APA_DATABASE_URL")
    created = existing is None
    n_interactions = n_samples = skipped = 0
    if created:
        session.add(Run(path=str(run_path), dataset=dataset.name, shards=int(config["shards"]), config=config,
                        base_model_name=base_model_name, base_model_sha256=base_model_sha256))
        forgotten = set(session.scalars(select(Forgotten.hmac))) | (forgotten or set())
        session.execute(insert(Item), [{"item_id": str(r.item_id), "title": str(r.title)}
                                       for r in dataset.items.itertuples(index=False)])
        rows = []
        for r in dataset.interactions.itertuples(index=False):
            ikey = f"{r.user_id}:{r.item_id}:{int(r.timestamp)}"
            if hmac_hex(key, "interaction", ikey) in forgotten:
                skipped += 1
                continue
            rows.append({"key": ikey, "user_id": str(r.user_id), "item_id": str(r.item_id),
                         "rating": float(r.rating), "timestamp": int(r.timestamp)})
        for chunk in _chunks(rows):
            session.execute(insert(Interaction), list(chunk))
        n_interactions = len(rows)
        ids = {str(k): int(i) for k, i in session.execute(select(Interaction.key, Interaction.id))}
        sample_rows: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        for split, samples in splits.items():
            for s in samples:
                if any(k not in ids for k in s.interaction_keys):
                    skipped += 1
                    continue
                sample_rows.append({"sample_id": s.sample_id, "user_id": s.user_id, "split": split,
                                    "shard": shard_of.get(s.sample_id), "label": s.label})
                links.extend({"sample_id": s.sample_id, "interaction_id": ids[k]} for k in s.interaction_keys)
        for chunk in _chunks(sample_rows):
            session.execute(insert(Sample), list(chunk))
        for chunk in _chunks(links):
            session.execute(insert(SampleInteraction), list(chunk))
        n_samples = len(sample_rows)
        for k in range(int(config["shards"])):
            session.add(Shard(shard=k, state=SERVING))
        session.flush()
    known = {(v.shard, v.version) for v in session.scalars(select(AdapterVersion))}
    added = 0
    for record in sorted(versions, key=lambda v: (v.shard, v.version)):
        if (record.shard, record.version) in known:
            continue
        now = utcnow()
        session.add(AdapterVersion(shard=record.shard, version=record.version, path=str(record.path.resolve()),
                                   manifest_sha256=record.manifest_sha256, n_samples=record.n_samples,
                                   metrics=record.metrics, served_at=now))
        shard = session.get(Shard, record.shard)
        if shard is None:
            raise LedgerError(f"the run has no shard {record.shard}")
        if shard.serving_version is None or (record.version > shard.serving_version and not shard.dirty):
            shard.serving_version = record.version
        added += 1
    audit(session=session, actor="cli", action="run.import",
          subject=run_path.name, detail={"interactions": n_interactions, "samples": n_samples,
                                          "versions_added": added, "skipped_forgotten": skipped})
    return ImportSummary(created=created, interactions=n_interactions, samples=n_samples,
                         skipped_forgotten=skipped, versions_added=added)


# -- reading for /recommend --------------------------------------------------------------------
def live_history(*, session: Session, user_id: str) -> list[tuple[str, float]]:
    """The user's live interactions as (item_id, rating), ordered by (timestamp, item_id)."""
    rows = session.execute(
        select(Interaction.item_id, Interaction.rating)
        .where(Interaction.user_id == user_id, Interaction.deleted_at.is_(None))
        .order_by(Interaction.timestamp, Interaction.item_id)
    ).all()
    if not rows:
        raise UserNotFound(f"user {user_id!r} is unknown or has no live interactions")
    return [(str(i), float(r)) for i, r in rows]


def titles(*, session: Session, item_ids: Sequence[str]) -> dict[str, str]:
    """Titles of the given items; the result lacks the unknown ones."""
    found: dict[str, str] = {}
    for chunk in _chunks(list(item_ids)):
        rows = session.execute(select(Item.item_id, Item.title).where(Item.item_id.in_(chunk)))
        found.update((str(i), str(t)) for i, t in rows)
    return found


def popular_items(*, session: Session, exclude: set[str], limit: int) -> list[str]:
    """The ``limit`` items with the most live interactions, leaving out ``exclude``."""
    count = func.count(Interaction.id)
    rows = session.execute(
        select(Interaction.item_id, count).where(Interaction.deleted_at.is_(None))
        .group_by(Interaction.item_id).order_by(count.desc(), Interaction.item_id).limit(limit + len(exclude))
    ).all()
    return [str(i) for i, _ in rows if i not in exclude][:limit]


def popularity(*, session: Session, item_ids: Sequence[str]) -> dict[str, int]:
    rows = session.execute(
        select(Interaction.item_id, func.count(Interaction.id))
        .where(Interaction.deleted_at.is_(None), Interaction.item_id.in_(list(item_ids)))
        .group_by(Interaction.item_id)
    ).all()
    return {str(i): int(n) for i, n in rows}


@dataclass(frozen=True)
class ShardView:
    shard: int
    state: str
    version: int | None
    path: Path | None
    n_samples: int | None
    trained_at: datetime | None
    manifest_sha256: str | None
    dirty: bool


def shard_views(*, session: Session) -> list[ShardView]:
    out = []
    for shard in session.scalars(select(Shard).order_by(Shard.shard)):
        version = _version(session=session, shard=shard.shard, version=shard.serving_version)
        out.append(ShardView(
            shard=shard.shard, state=shard.state, version=shard.serving_version,
            path=Path(version.path) if version else None, n_samples=version.n_samples if version else None,
            trained_at=as_utc(version.created_at) if version else None,
            manifest_sha256=version.manifest_sha256 if version else None, dirty=shard.dirty,
        ))
    return out


def _version(*, session: Session, shard: int, version: int | None) -> AdapterVersion | None:
    if version is None:
        return None
    return session.scalars(
        select(AdapterVersion).where(AdapterVersion.shard == shard, AdapterVersion.version == version)
    ).first()


def live_sample_ids(*, session: Session, split: str, shard: int | None = None) -> list[str]:
    query = select(Sample.sample_id).where(Sample.split == split, Sample.deleted_at.is_(None))
    if shard is not None:
        query = query.where(Sample.shard == shard)
    return sorted(session.scalars(query))


def deletion_counts(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(DeletionRequest.status, func.count()).group_by(DeletionRequest.status)).all()
    return {str(status): int(n) for status, n in rows}


# -- deletion ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeletionOutcome:
    request: DeletionRequest
    created: bool  # False: an earlier request with the same Idempotency-Key
    valid_sample_ids: list[str]  # validation samples dropped from the attention memory


def get_deletion(*, session: Session, request_id: str) -> DeletionRequest:
    request = session.get(DeletionRequest, request_id)
    if request is None:
        raise DeletionNotFound(f"no deletion request {request_id!r}")
    return request


def idempotency_hmac(*, key: bytes, user_id: str, item_ids: Sequence[str] | None) -> str:
    """What an Idempotency-Key binds: the request's user and items (an HMAC: the ledger keeps no user ids)."""
    items = None if item_ids is None else sorted(set(item_ids))
    return hmac_hex(key, "idempotency", json.dumps({"user": user_id, "items": items}, separators=(",", ":")))


def find_idempotent(*, session: Session, token_hmac: str, idempotency_key: str, binding: str) -> DeletionRequest | None:
    """The request this token made under this key in the last 24 h, if any.

    A key names one request: reused for another user or other items it is refused
    (:class:`IdempotencyConflict`), never matched. An expired key is released for reuse.
    """
    earlier = session.scalars(select(DeletionRequest).where(
        DeletionRequest.token_hmac == token_hmac, DeletionRequest.idempotency_key == idempotency_key)).first()
    if earlier is None:
        return None
    created = as_utc(earlier.created_at)
    if created is not None and created < utcnow() - IDEMPOTENCY_WINDOW:
        earlier.idempotency_key = None
        session.flush()
        return None
    if earlier.idempotency_hmac != binding:
        raise IdempotencyConflict("this Idempotency-Key was used for another deletion request (another user "
                                  "or other items); use a new key for a new request")
    return earlier


def _event(*, session: Session, request: DeletionRequest, status: str, detail: str | None = None) -> None:
    request.status = status
    session.add(DeletionEvent(request_id=request.id, status=status, detail=detail))


def request_deletion(
    *, session: Session, user_id: str, item_ids: Sequence[str] | None, key: bytes,
    idempotency_key: str | None = None, token_hmac: str | None = None, actor: str = "api",
) -> DeletionOutcome:
    """Tombstone the interactions, every sample containing one, and quarantine every shard they trained.

    The request's first status is ``quarantined``, or ``completed`` when no shard is affected.
    """
    binding: str | None = None
    if idempotency_key and token_hmac:
        binding = idempotency_hmac(key=key, user_id=user_id, item_ids=item_ids)
        earlier = find_idempotent(session=session, token_hmac=token_hmac, idempotency_key=idempotency_key,
                                  binding=binding)
        if earlier is not None:
            return DeletionOutcome(request=earlier, created=False, valid_sample_ids=[])
    now = utcnow()
    request = DeletionRequest(id=uuid.uuid4().hex, subject_hmac=hmac_hex(key, "user", user_id),
                              idempotency_key=idempotency_key if binding else None, token_hmac=token_hmac,
                              idempotency_hmac=binding, status=QUARANTINED, created_at=now)
    try:
        with session.begin_nested():  # claims the key before any interaction is locked
            session.add(request)
            session.flush()
    except IntegrityError:
        if binding is None or token_hmac is None or idempotency_key is None:
            raise
        # A concurrent request with the same key committed first: its answer is this one's.
        winner = find_idempotent(session=session, token_hmac=token_hmac, idempotency_key=idempotency_key,
                                 binding=binding)
        if winner is None:
            raise
        return DeletionOutcome(request=winner, created=False, valid_sample_ids=[])
    query = select(Interaction).where(Interaction.user_id == user_id, Interaction.deleted_at.is_(None))
    if item_ids is not None:
        query = query.where(Interaction.item_id.in_(list(item_ids)))
    interactions = list(session.scalars(query.with_for_update()))
    if not interactions:
        what = f" with item(s) {sorted(item_ids)}" if item_ids is not None else ""
        raise UserNotFound(f"user {user_id!r} has no live interactions{what}")
    interaction_ids = [i.id for i in interactions]
    for chunk in _chunks(interaction_ids):
        session.execute(update(Interaction).where(Interaction.id.in_(chunk))
                        .values(deleted_at=now, deletion_id=request.id))
    samples: dict[str, Sample] = {}
    for chunk in _chunks(interaction_ids):
        found = session.scalars(
            select(Sample).join(SampleInteraction, SampleInteraction.sample_id == Sample.sample_id)
            .where(SampleInteraction.interaction_id.in_(chunk), Sample.deleted_at.is_(None))
        )
        samples.update((s.sample_id, s) for s in found)
    for sample in samples.values():
        sample.deleted_at, sample.deletion_id = now, request.id
    affected = sorted({s.shard for s in samples.values() if s.split == "train" and s.shard is not None})
    for k in affected:
        shard = session.get(Shard, k, with_for_update=True)
        if shard is None:
            raise LedgerError(f"sample in unknown shard {k}")
        shard.dirty_seq += 1
        if shard.state == SERVING:
            shard.state = QUARANTINED
        old = _version(session=session, shard=k, version=shard.serving_version)
        session.add(DeletionShard(request_id=request.id, shard=k, seq=shard.dirty_seq,
                                  old_version=shard.serving_version,
                                  old_manifest_sha256=old.manifest_sha256 if old else None))
    request.affected_shards = affected
    request.interactions_removed = len(interactions)
    request.samples_removed = len(samples)
    request.deleted_hmacs = sorted(hmac_hex(key, "interaction", i.key) for i in interactions)
    session.add(DeletionEvent(request_id=request.id, status=QUARANTINED,
                              detail=f"{len(interactions)} interactions, {len(samples)} samples, shards {affected}"))
    audit(session=session, actor=actor, action="deletion.request", subject=request.id,
          detail={"affected_shards": affected, "interactions": len(interactions), "samples": len(samples)})
    session.flush()
    if not affected:
        _complete(session=session, request=request, key=key)
    valid = sorted(s.sample_id for s in samples.values() if s.split == "valid")
    return DeletionOutcome(request=request, created=True, valid_sample_ids=valid)


def _deleted_keys(*, session: Session, request_id: str) -> set[str]:
    return set(session.scalars(select(Interaction.key).where(Interaction.deletion_id == request_id)))


def _serving_manifests(*, session: Session) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for view in shard_views(session=session):
        if view.path is not None:
            out.append((view.shard, json.loads((view.path / "manifest.json").read_text())))
    return out


def _complete(*, session: Session, request: DeletionRequest, key: bytes) -> None:
    """Issue the certificate: every serving manifest is checked for the request's deleted interactions."""
    deleted = _deleted_keys(session=session, request_id=request.id)
    manifests = _serving_manifests(session=session)
    violations = sum(1 for _, doc in manifests for s in doc["samples"] if deleted & set(s["interaction_keys"]))
    now = utcnow()
    shards = session.scalars(select(DeletionShard).where(DeletionShard.request_id == request.id)
                             .order_by(DeletionShard.shard))
    request.certificate = {
        "request_id": request.id,
        "interactions_removed": request.interactions_removed,
        "samples_removed": request.samples_removed,
        "shards": [{"shard": d.shard, "old_version": d.old_version, "new_version": d.new_version,
                    "old_manifest_sha256": d.old_manifest_sha256, "new_manifest_sha256": d.new_manifest_sha256}
                   for d in shards],
        "deleted_hmacs": list(request.deleted_hmacs),
        "serving_manifests_checked": len(manifests),
        "violations": violations,
        "issued_at": now.isoformat(),
    }
    if violations:
        request.error = f"{violations} serving manifest sample(s) still contain deleted interactions"
        _event(session=session, request=request, status=FAILED, detail=request.error)
        return
    request.completed_at = now
    _event(session=session, request=request, status=COMPLETED)
    samples = session.scalars(select(Sample.sample_id).where(Sample.deletion_id == request.id))
    known = set(session.scalars(select(Forgotten.hmac).where(Forgotten.request_id == request.id)))
    for kind, values in (("interaction", deleted), ("sample", set(samples))):
        for value in sorted(values):
            digest = hmac_hex(key, kind, value)
            if digest not in known and session.get(Forgotten, digest) is None:
                session.add(Forgotten(hmac=digest, kind=kind, request_id=request.id))
    audit(session=session, actor="ledger", action="deletion.completed", subject=request.id,
          detail={"serving_manifests_checked": len(manifests), "violations": 0})


# -- retraining --------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetrainSnapshot:
    shard: int
    seq: int
    sample_ids: list[str]  # the shard's live training samples
    valid_ids: list[str]  # live validation samples
    old_version: int | None
    run_path: Path


def dirty_shards(*, session: Session, include_failed: bool = False) -> list[int]:
    query = select(Shard.shard).where(Shard.dirty_seq > Shard.clean_seq)
    if not include_failed:
        query = query.where(Shard.state != FAILED)
    return sorted(session.scalars(query))


def begin_retrain(*, session: Session, shard: int) -> RetrainSnapshot | None:
    """Snapshot a dirty shard's live samples and mark it (and the requests it covers) ``retraining``."""
    row = session.get(Shard, shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {shard}")
    if not row.dirty or row.state == FAILED:
        return None
    row.state = RETRAINING
    for request in _pending_requests(session=session, shard=shard, up_to=row.dirty_seq):
        if request.status == QUARANTINED:
            _event(session=session, request=request, status=RETRAINING, detail=f"shard {shard}")
    audit(session=session, actor="worker", action="shard.retrain.start", subject=f"shard-{shard}",
          detail={"seq": row.dirty_seq})
    return RetrainSnapshot(shard=shard, seq=row.dirty_seq,
                           sample_ids=live_sample_ids(session=session, split="train", shard=shard),
                           valid_ids=live_sample_ids(session=session, split="valid"),
                           old_version=row.serving_version, run_path=Path(get_run(session=session).path))


def _pending_requests(*, session: Session, shard: int, up_to: int | None = None) -> list[DeletionRequest]:
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
    quarantined (and another retrain follows). Returns the ids of the requests completed.
    """
    row = session.get(Shard, snapshot.shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {snapshot.shard}")
    now = utcnow()
    old = _version(session=session, shard=row.shard, version=row.serving_version)
    if old is not None:
        old.retired_at = now
    session.add(AdapterVersion(shard=record.shard, version=record.version, path=str(record.path.resolve()),
                               manifest_sha256=record.manifest_sha256, n_samples=record.n_samples,
                               metrics=record.metrics, covers_seq=snapshot.seq, served_at=now))
    row.serving_version = record.version
    row.clean_seq = max(row.clean_seq, snapshot.seq)
    row.state = QUARANTINED if row.dirty else SERVING
    session.flush()
    completed = []
    touched = session.scalars(select(DeletionShard).where(DeletionShard.shard == row.shard,
                                                          DeletionShard.done_at.is_(None),
                                                          DeletionShard.seq <= snapshot.seq))
    for part in touched:
        part.new_version, part.new_manifest_sha256, part.done_at = record.version, record.manifest_sha256, now
    session.flush()
    for request in _requests_ready(session=session):
        _complete(session=session, request=request, key=key)
        if request.status == COMPLETED:
            completed.append(request.id)
    audit(session=session, actor="worker", action="shard.publish", subject=f"shard-{row.shard}",
          detail={"version": record.version, "manifest_sha256": record.manifest_sha256, "state": row.state})
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
    row.state = FAILED
    failed = []
    for request in _pending_requests(session=session, shard=shard):
        request.error = f"shard {shard}: {error}"
        _event(session=session, request=request, status=FAILED, detail=request.error)
        failed.append(request.id)
    audit(session=session, actor="worker", action="shard.retrain.failed", subject=f"shard-{shard}",
          detail={"error": error[:500]})
    return failed


def request_retrain(*, session: Session, shard: int, actor: str = "admin") -> None:
    """Let the worker try a dirty (e.g. failed) shard again."""
    row = session.get(Shard, shard, with_for_update=True)
    if row is None:
        raise ShardNotFound(f"no shard {shard}")
    if not row.dirty:
        raise NothingToRetrain(f"shard {shard} holds no deleted data; nothing to retrain")
    if row.state == FAILED:
        row.state = QUARANTINED
        for request in _pending_requests(session=session, shard=shard):
            if request.status == FAILED:
                request.error = None
                _event(session=session, request=request, status=QUARANTINED, detail="retry requested")
    audit(session=session, actor=actor, action="shard.retrain.request", subject=f"shard-{shard}")


# -- purge -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PurgePlan:
    request_id: str
    sample_ids: list[str]
    superseded: list[Path]  # version folders trained on the deleted data
    run_path: Path
    interaction_hmacs: list[str]


def pending_purges(*, session: Session) -> list[str]:
    return list(session.scalars(select(DeletionRequest.id).where(
        DeletionRequest.status == COMPLETED, DeletionRequest.purged_at.is_(None)).order_by(DeletionRequest.created_at)))


def purge_plan(*, session: Session, request_id: str) -> PurgePlan:
    request = get_deletion(session=session, request_id=request_id)
    parts = session.scalars(select(DeletionShard).where(DeletionShard.request_id == request.id)).all()
    superseded: list[Path] = []
    for part in parts:
        stale = session.scalars(select(AdapterVersion).where(
            AdapterVersion.shard == part.shard, AdapterVersion.version < (part.new_version or 0),
            AdapterVersion.purged_at.is_(None)))
        superseded.extend(Path(v.path) for v in stale)
    sample_ids = session.scalars(select(Sample.sample_id).where(Sample.deletion_id == request.id))
    return PurgePlan(request_id=request.id, sample_ids=sorted(sample_ids),
                     superseded=sorted(set(superseded)), run_path=Path(get_run(session=session).path),
                     interaction_hmacs=list(request.deleted_hmacs))


def finish_purge(*, session: Session, plan: PurgePlan) -> None:
    """Delete the request's interaction and sample rows; mark superseded versions purged."""
    now = utcnow()
    paths = [str(p) for p in plan.superseded]
    for chunk in _chunks(paths):
        session.execute(update(AdapterVersion).where(AdapterVersion.path.in_(chunk)).values(purged_at=now))
    sample_ids = list(session.scalars(select(Sample.sample_id).where(Sample.deletion_id == plan.request_id)))
    for chunk in _chunks(sample_ids):
        session.execute(delete(SampleInteraction).where(SampleInteraction.sample_id.in_(chunk)))
        session.execute(delete(Sample).where(Sample.sample_id.in_(chunk)))
    interaction_ids = list(session.scalars(select(Interaction.id).where(Interaction.deletion_id == plan.request_id)))
    for chunk in _chunks(interaction_ids):
        session.execute(delete(SampleInteraction).where(SampleInteraction.interaction_id.in_(chunk)))
        session.execute(delete(Interaction).where(Interaction.id.in_(chunk)))
    request = get_deletion(session=session, request_id=plan.request_id)
    request.purged_at = now
    audit(session=session, actor="worker", action="deletion.purged", subject=plan.request_id,
          detail={"interaction_rows": len(interaction_ids), "sample_rows": len(sample_ids),
                  "adapter_versions": len(paths)})


def status_history(*, session: Session, request_id: str) -> list[DeletionEvent]:
    return list(session.scalars(select(DeletionEvent).where(DeletionEvent.request_id == request_id)
                                .order_by(DeletionEvent.id)))


def open_deletions_created(*, session: Session) -> list[datetime]:
    """When each deletion still waiting for its retrain (quarantined or retraining) was made, oldest first.

    Failed requests are not in it: they wait for an admin's retry, which no serving policy can hasten.
    """
    rows = session.scalars(select(DeletionRequest.created_at)
                           .where(DeletionRequest.status.in_([QUARANTINED, RETRAINING]))
                           .order_by(DeletionRequest.created_at))
    return [created for created in (as_utc(row) for row in rows) if created is not None]


def completed_since(*, session: Session, since: datetime) -> list[DeletionRequest]:
    return list(session.scalars(select(DeletionRequest).where(DeletionRequest.completed_at > since)))

