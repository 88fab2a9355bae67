"""Deletion requests: idempotency, quarantine, completion with a certificate, status history.

Each function works inside the caller's session (one transaction); none commits. Imports no torch.
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from apa import artifacts
from apa.hashing import hmac_hex
from ledger import common
from ledger.catalog import shard_views
from ledger.common import chunks, record_event, version_row, write_audit
from ledger.errors import DeletionNotFound, LedgerError, UserNotFound
from ledger.models import (
    COMPLETED,
    FAILED,
    QUARANTINED,
    RETRAINING,
    SERVING,
    AdapterVersion,
    DeletionEvent,
    DeletionRequest,
    DeletionShard,
    Forgotten,
    Interaction,
    Sample,
    SampleInteraction,
    Shard,
    as_utc,
    utcnow,
)


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
    """The deletion request this token made under this key in the last 24 h, if any (see
    :func:`ledger.common.find_idempotent`)."""
    return common.find_idempotent(
        session=session, model=DeletionRequest, token_hmac=token_hmac, idempotency_key=idempotency_key,
        binding=binding, conflict="this Idempotency-Key was used for another deletion request (another user "
                                  "or other items); use a new key for a new request")


def request_deletion(
    *, session: Session, user_id: str, item_ids: Sequence[str] | None, key: bytes,
    idempotency_key: str | None = None, token_hmac: str | None = None, actor: str = "api",
) -> DeletionOutcome:
    """Tombstone the interactions, every sample containing one, and quarantine every shard they trained.

    The request's first status is ``quarantined``, or ``completed`` when no shard is affected.
    """
    common.lock_user(session=session, user_id=user_id)  # no ingestion builds samples on what this tombstones
    now = utcnow()
    request, created = _claim_request(session=session, user_id=user_id, item_ids=item_ids, key=key,
                                      idempotency_key=idempotency_key, token_hmac=token_hmac, now=now)
    if not created:
        return DeletionOutcome(request=request, created=False, valid_sample_ids=[])
    interactions, samples = _tombstone(session=session, request=request, user_id=user_id, item_ids=item_ids, now=now)
    affected = _quarantine(session=session, request=request, samples=samples, key=key)
    request.affected_shards = affected
    request.interactions_removed = len(interactions)
    request.samples_removed = len(samples)
    request.deleted_hmacs = sorted(hmac_hex(key, "interaction", i.key) for i in interactions)
    session.add(DeletionEvent(request_id=request.id, status=QUARANTINED,
                              detail=f"{len(interactions)} interactions, {len(samples)} samples, shards {affected}"))
    write_audit(session=session, actor=actor, action="deletion.request", subject=request.id,
                detail={"affected_shards": affected, "interactions": len(interactions), "samples": len(samples)})
    session.flush()
    if not affected:
        complete(session=session, request=request, key=key)
    valid = sorted(s.sample_id for s in samples if s.split == "valid")
    return DeletionOutcome(request=request, created=True, valid_sample_ids=valid)


def _claim_request(
    *, session: Session, user_id: str, item_ids: Sequence[str] | None, key: bytes, idempotency_key: str | None,
    token_hmac: str | None, now: datetime,
) -> tuple[DeletionRequest, bool]:
    """The new request, its Idempotency-Key claimed before any interaction is locked (True); or the earlier
    request this token made under that key, which answers this one (False)."""
    binding: str | None = None
    if idempotency_key and token_hmac:
        binding = idempotency_hmac(key=key, user_id=user_id, item_ids=item_ids)
        earlier = find_idempotent(session=session, token_hmac=token_hmac, idempotency_key=idempotency_key,
                                  binding=binding)
        if earlier is not None:
            return earlier, False
    request = DeletionRequest(id=uuid.uuid4().hex, subject_hmac=hmac_hex(key, "user", user_id),
                              idempotency_key=idempotency_key if binding else None, token_hmac=token_hmac,
                              idempotency_hmac=binding, status=QUARANTINED, created_at=now)
    try:
        with session.begin_nested():
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
        return winner, False
    return request, True


def _tombstone(
    *, session: Session, request: DeletionRequest, user_id: str, item_ids: Sequence[str] | None, now: datetime,
) -> tuple[list[Interaction], list[Sample]]:
    """Mark the user's live interactions (those items, or all) and every live sample containing one deleted
    by ``request``; a user with none is a ``UserNotFound``."""
    query = select(Interaction).where(Interaction.user_id == user_id, Interaction.deleted_at.is_(None))
    if item_ids is not None:
        query = query.where(Interaction.item_id.in_(list(item_ids)))
    interactions = list(session.scalars(query.with_for_update()))
    if not interactions:
        what = f" with item(s) {sorted(item_ids)}" if item_ids is not None else ""
        raise UserNotFound(f"user {user_id!r} has no live interactions{what}")
    interaction_ids = [i.id for i in interactions]
    for chunk in chunks(interaction_ids):
        session.execute(update(Interaction).where(Interaction.id.in_(chunk))
                        .values(deleted_at=now, deletion_id=request.id))
    samples: dict[str, Sample] = {}
    for chunk in chunks(interaction_ids):
        found = session.scalars(
            select(Sample).join(SampleInteraction, SampleInteraction.sample_id == Sample.sample_id)
            .where(SampleInteraction.interaction_id.in_(chunk), Sample.deleted_at.is_(None))
        )
        samples.update((s.sample_id, s) for s in found)
    for sample in samples.values():
        sample.deleted_at, sample.deletion_id = now, request.id
    return interactions, list(samples.values())


def _quarantine(*, session: Session, request: DeletionRequest, samples: Sequence[Sample], key: bytes) -> list[int]:
    """Quarantine every shard a deleted sample trained, or whose serving version chose its epoch on one;
    returns them. An ingested sample no version has trained on (nor a retrain claimed) needs no retrain."""
    affected = sorted({s.shard for s in samples if s.split == "train" and s.shard is not None and not untrained(s)}
                      | chose_epoch_on(session=session, sample_ids={s.sample_id for s in samples
                                                                    if s.split == "valid"}))
    for k in affected:
        shard = session.get(Shard, k, with_for_update=True)
        if shard is None:
            raise LedgerError(f"sample in unknown shard {k}")
        shard.dirty_seq += 1
        if shard.state == SERVING:
            shard.state = QUARANTINED
        old = version_row(session=session, shard=k, version=shard.serving_version)
        session.add(DeletionShard(request_id=request.id, shard=k, seq=shard.dirty_seq,
                                  old_version=shard.serving_version,
                                  old_manifest_hmac=manifest_hmac(key=key, version=old)))
    return affected


def manifest_hmac(*, key: bytes, version: AdapterVersion | None) -> str | None:
    """How a version that held deleted data is named afterwards: HMAC-SHA256 of its manifest's sha256. The
    plain hash would let anyone who tries each possible sample against it find the deleted one."""
    if version is None or version.manifest_sha256 is None:
        return None
    return hmac_hex(key, "manifest", version.manifest_sha256)


def chose_epoch_on(*, session: Session, sample_ids: set[str]) -> set[int]:
    """The shards whose serving version chose its epoch on one of these validation samples (its manifest
    names them, and replaying it needs them), and those retraining now, for a deletion or for ingested
    samples (their snapshot may hold them)."""
    if not sample_ids:
        return set()
    chosen = {k for k, doc in _serving_manifests(session=session) if artifacts.selection_ids(doc) & sample_ids}
    retraining = set(session.scalars(select(Shard.shard).where(Shard.state == RETRAINING)))
    claimed = set(session.scalars(select(Sample.shard).where(Sample.claimed_at.is_not(None),
                                                             Sample.trained_version.is_(None)).distinct()))
    return chosen | retraining | {k for k in claimed if k is not None}


def untrained(sample: Sample) -> bool:
    """An ingested sample that no version trained on and no retrain has claimed."""
    return sample.ingested_at is not None and sample.trained_version is None and sample.claimed_at is None


def _deleted_keys(*, session: Session, request_id: str) -> set[str]:
    return set(session.scalars(select(Interaction.key).where(Interaction.deletion_id == request_id)))


def _serving_manifests(*, session: Session) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for view in shard_views(session=session):
        if view.path is not None:
            out.append((view.shard, json.loads((view.path / "manifest.json").read_text())))
    return out


def _replay(*, session: Session, shard: int, version: int | None) -> dict[str, str | None]:
    """The new version's weights sha256 and the command that replays it from its manifest (recorded with
    the version), so anyone can check that it is what training without the deleted data gives."""
    row = version_row(session=session, shard=shard, version=version)
    metrics = row.metrics if row is not None else {}
    return {"new_adapter_sha256": metrics.get("adapter_sha256"), "verify": metrics.get("verify")}


def complete(*, session: Session, request: DeletionRequest, key: bytes) -> None:
    """Issue the certificate: every serving manifest is checked for the request's deleted interactions."""
    deleted = _deleted_keys(session=session, request_id=request.id)
    manifests = _serving_manifests(session=session)
    samples = set(session.scalars(select(Sample.sample_id).where(Sample.deletion_id == request.id)))
    violations = sum(1 for _, doc in manifests for s in doc["samples"] if deleted & set(s["interaction_keys"]))
    violations += sum(1 for _, doc in manifests if artifacts.selection_ids(doc) & samples)
    now = utcnow()
    shards = session.scalars(select(DeletionShard).where(DeletionShard.request_id == request.id)
                             .order_by(DeletionShard.shard))
    request.certificate = {
        "request_id": request.id,
        "interactions_removed": request.interactions_removed,
        "samples_removed": request.samples_removed,
        "untrained_samples_removed": sum(1 for s in session.scalars(select(Sample).where(
            Sample.deletion_id == request.id, Sample.split == "train")) if untrained(s)),
        "shards": [{"shard": d.shard, "old_version": d.old_version, "new_version": d.new_version,
                    "old_manifest_sha256": None, "old_manifest_hmac": d.old_manifest_hmac,
                    "new_manifest_sha256": d.new_manifest_sha256,
                    **_replay(session=session, shard=d.shard, version=d.new_version)}
                   for d in shards],
        "deleted_hmacs": list(request.deleted_hmacs),
        "serving_manifests_checked": len(manifests),
        "violations": violations,
        "issued_at": now.isoformat(),
    }
    if violations:
        request.error = (f"{violations} serving manifest sample(s) or epoch selection(s) still hold deleted "
                         "data")
        record_event(session=session, request=request, status=FAILED, detail=request.error)
        return
    request.completed_at = now
    record_event(session=session, request=request, status=COMPLETED)
    known = set(session.scalars(select(Forgotten.hmac).where(Forgotten.request_id == request.id)))
    for kind, values in (("interaction", deleted), ("sample", samples)):
        for value in sorted(values):
            digest = hmac_hex(key, kind, value)
            if digest not in known and session.get(Forgotten, digest) is None:
                session.add(Forgotten(hmac=digest, kind=kind, request_id=request.id))
    write_audit(session=session, actor="ledger", action="deletion.completed", subject=request.id,
                detail={"serving_manifests_checked": len(manifests), "violations": 0})




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
