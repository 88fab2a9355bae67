"""The ledger's tables (SQLAlchemy 2, typed declarative). Imports no torch.

One ledger serves one run. It maps every interaction to every sample that contains it (as target or
in history) and every training sample to its shard, so a deletion finds exactly the shards to
retrain. Deleted data is tombstoned (``deleted_at``) until the retrain that forgets it is live, then
purged; what remains afterwards is HMACs (``forgotten``) and the deletion request's certificate.

Shard freshness is two counters: each deletion that touches a shard bumps ``dirty_seq``; a retrain
snapshots it and, once live, sets ``clean_seq`` to the snapshot. The shard is dirty while
``dirty_seq > clean_seq``, so deletions that arrive during a retrain cost one more retrain, not N.

Ingested samples (``POST /users/{id}/interactions``) carry their prompt texts and content in their row
(``ingested_at`` set): the run folder knows nothing of them. A training one is *pending* until a
version of its shard trained on it (``trained_version``); a retrain claims the pending samples it
snapshots (``claimed_at``), so a deletion of a claimed sample quarantines the shard like any trained one.
"""

import secrets
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(200)  # user, item and interaction ids and keys
DIGEST = String(64)  # hex sha256 / HMAC-SHA256
# Interaction ids: 64-bit; on SQLite the rowid itself (an INTEGER PRIMARY KEY), so no hidden rowid keeps the
# order rows were inserted in.
INTERACTION_ID = BigInteger().with_variant(Integer(), "sqlite")

# shard states (DESIGN.md, GET /admin/status)
SERVING, QUARANTINED, RETRAINING, FAILED = "serving", "quarantined", "retraining", "failed"
SHARD_STATES = (SERVING, QUARANTINED, RETRAINING, FAILED)
# deletion request states (DESIGN.md, GET /deletions/{id})
COMPLETED = "completed"
DELETION_STATES = (QUARANTINED, RETRAINING, COMPLETED, FAILED)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_interaction_id() -> int:
    """A random 63-bit id. Ids handed out in (user, time) order would let the gap a deletion leaves between
    its neighbours' ids name the user; random ones say nothing of whose interaction it was, or when."""
    return secrets.randbits(63)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True), dict[str, Any]: JSON, list[Any]: JSON,
    }


class Run(Base):
    """The run this ledger serves (one row)."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    dataset: Mapped[str] = mapped_column(String(256))
    shards: Mapped[int]
    config: Mapped[dict[str, Any]]
    base_model_name: Mapped[str] = mapped_column(String(256))
    base_model_sha256: Mapped[str] = mapped_column(DIGEST)
    imported_at: Mapped[datetime] = mapped_column(default=utcnow)


class Item(Base):
    __tablename__ = "items"

    item_id: Mapped[str] = mapped_column(ID, primary_key=True)
    title: Mapped[str] = mapped_column(String(1024))


class Interaction(Base):
    __tablename__ = "interactions"

    id: Mapped[int] = mapped_column(INTERACTION_ID, primary_key=True, autoincrement=False, default=new_interaction_id)
    key: Mapped[str] = mapped_column(ID, unique=True)  # <user_id>:<item_id>:<timestamp>
    user_id: Mapped[str] = mapped_column(ID, index=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("items.item_id"), index=True)
    rating: Mapped[float] = mapped_column(Float)
    timestamp: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[datetime | None]
    deletion_id: Mapped[str | None] = mapped_column(ForeignKey("deletion_requests.id"), index=True)


class Sample(Base):
    __tablename__ = "samples"

    sample_id: Mapped[str] = mapped_column(ID, primary_key=True)  # its target interaction's key
    user_id: Mapped[str] = mapped_column(ID, index=True)
    split: Mapped[str] = mapped_column(String(8))
    shard: Mapped[int | None] = mapped_column(index=True)  # training samples only (None: not assigned yet)
    label: Mapped[int]
    deleted_at: Mapped[datetime | None]
    deletion_id: Mapped[str | None] = mapped_column(ForeignKey("deletion_requests.id"), index=True)
    # Ingested samples only (run samples keep theirs in the run folder): frozen at ingestion.
    ingested_at: Mapped[datetime | None] = mapped_column(index=True)
    content: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # apa.samples.Sample.content()
    prompt: Mapped[str | None] = mapped_column(Text)
    history_prompt: Mapped[str | None] = mapped_column(Text)
    prepared_at: Mapped[datetime | None]  # train: shard assigned; valid: in the validation memory
    claimed_at: Mapped[datetime | None]  # a retrain snapshot took it
    trained_version: Mapped[int | None]  # the first version of its shard that trained on it


class SampleInteraction(Base):
    """Every interaction a sample contains (its history and its target)."""

    __tablename__ = "sample_interactions"

    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id", ondelete="CASCADE"), primary_key=True)
    interaction_id: Mapped[int] = mapped_column(
        INTERACTION_ID, ForeignKey("interactions.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Shard(Base):
    __tablename__ = "shards"

    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(16), default=SERVING)
    serving_version: Mapped[int | None]
    dirty_seq: Mapped[int] = mapped_column(default=0)
    clean_seq: Mapped[int] = mapped_column(default=0)
    # Semantic runs: the unit mean of the live members' embeddings, as the last assignment used it.
    centre: Mapped[list[Any] | None] = mapped_column(JSON)
    # The last retrain for ingested data alone failed: its triggers wait for an admin's retry.
    ingest_error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    @property
    def dirty(self) -> bool:
        return self.dirty_seq > self.clean_seq


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (Index("ix_adapter_versions_shard_version", "shard", "version", unique=True),)

    id: Mapped[int] = mapped_column(primary_key=True)
    shard: Mapped[int] = mapped_column(ForeignKey("shards.shard"))
    version: Mapped[int]
    path: Mapped[str] = mapped_column(String(1024))
    # None once purged: a plain hash of a manifest that held deleted data would let anyone confirm a guess
    # of that data (ledger.purges); the purge empties ``metrics`` (its adapter sha256) for the same reason.
    manifest_sha256: Mapped[str | None] = mapped_column(DIGEST)
    n_samples: Mapped[int]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    covers_seq: Mapped[int] = mapped_column(default=0)  # the shard's dirty_seq its samples were snapshot at
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    served_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"
    # One request per (token, key): concurrent reuses of a key meet this constraint and read the winner.
    __table_args__ = (UniqueConstraint("token_hmac", "idempotency_key", name="uq_deletion_requests_idempotency"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject_hmac: Mapped[str] = mapped_column(DIGEST)  # HMAC of the user id: the request holds no data
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    token_hmac: Mapped[str | None] = mapped_column(DIGEST)
    # HMAC of the request's user and items: a key reused for another request is refused, not matched
    idempotency_hmac: Mapped[str | None] = mapped_column(DIGEST)
    status: Mapped[str] = mapped_column(String(16), index=True)
    affected_shards: Mapped[list[Any]] = mapped_column(default=list)
    interactions_removed: Mapped[int] = mapped_column(default=0)
    samples_removed: Mapped[int] = mapped_column(default=0)
    deleted_hmacs: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    purged_at: Mapped[datetime | None]
    certificate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class IngestionRequest(Base):
    """One accepted ``POST /users/{id}/interactions``: its answer (counts and shards only), for idempotency."""

    __tablename__ = "ingestion_requests"
    __table_args__ = (UniqueConstraint("token_hmac", "idempotency_key", name="uq_ingestion_requests_idempotency"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject_hmac: Mapped[str] = mapped_column(DIGEST)  # HMAC of the user id: replicas drop that user's caches
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    token_hmac: Mapped[str | None] = mapped_column(DIGEST)
    idempotency_hmac: Mapped[str | None] = mapped_column(DIGEST)  # HMAC of the user and the batch
    answer: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DeletionShard(Base):
    """One shard a deletion request touched, and the versions before and after it was forgotten.

    The old version held the deleted data: its manifest is named only by HMAC-SHA256 under ``APA_HMAC_KEY``,
    never by its plain hash. The new version's plain hash goes (None) when a later deletion purges it.
    """

    __tablename__ = "deletion_shards"

    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), primary_key=True)
    shard: Mapped[int] = mapped_column(ForeignKey("shards.shard"), primary_key=True)
    seq: Mapped[int]  # the shard's dirty_seq this request set
    old_version: Mapped[int | None]
    old_manifest_hmac: Mapped[str | None] = mapped_column(DIGEST)
    new_version: Mapped[int | None]
    new_manifest_sha256: Mapped[str | None] = mapped_column(DIGEST)
    done_at: Mapped[datetime | None]


class DeletionEvent(Base):
    """A deletion request's status history."""

    __tablename__ = "deletion_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    detail: Mapped[str | None] = mapped_column(Text)


class Forgotten(Base):
    """HMACs of deleted interactions and samples: proof of what was removed, and a block on re-import."""

    __tablename__ = "forgotten"

    hmac: Mapped[str] = mapped_column(DIGEST, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(ForeignKey("deletion_requests.id"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only. Subjects are request ids, shard numbers and versions, never user data."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back naive; every time in the ledger is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)
