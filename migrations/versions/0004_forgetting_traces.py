"""What a deletion leaves must not give the data back: no plain hash of a purged version, and interaction ids
that say nothing of whose interaction they are.

Plain hashes: a version that held deleted data is named by HMAC-SHA256 only (``old_manifest_hmac``, which
replaces ``deletion_shards.old_manifest_sha256``). The migration cannot know ``APA_HMAC_KEY``, so what
today's ledgers hold goes rather than turn into HMACs: every ``old_manifest_sha256`` (the column's and the
certificates'), and for each purged version its row's ``manifest_sha256`` and metrics (its adapter's
sha256), the new-version hashes that name it in ``deletion_shards`` and in certificates, and the
manifest hash each ``shard.publish`` audit entry carried.

Ids handed out in (user, time) order let the gap a deletion leaves between its neighbours' ids name the
user. Every existing id is replaced by a random one (``ledger.models.new_interaction_id``), in
``interactions`` and in ``sample_interactions``, its one foreign key; PostgreSQL widens both columns to
BIGINT, drops the id sequence and rewrites the table in the new ids' order (``CLUSTER``), so neither the
ids nor the rows' places on disk keep the old order. SQLite keeps INTEGER: the id is the rowid, and a
row moves with it.

Downgrading keeps the random ids (the old order is gone for good) and gives PostgreSQL its sequence back;
forgotten hashes stay forgotten (a purged version's ``manifest_sha256`` becomes the empty string).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ledger.models import new_interaction_id

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LINK_FK = "fk_sample_interactions_interaction_id_interactions"


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def _random_ids() -> None:
    """old id -> a fresh random id (never one of the old ids, so no UPDATE meets a row not yet moved)."""
    bind = op.get_bind()
    old = [int(i) for i in bind.execute(sa.text("SELECT id FROM interactions")).scalars()]
    taken = set(old)
    mapping = []
    for old_id in old:
        new_id = new_interaction_id()
        while new_id in taken:
            new_id = new_interaction_id()
        taken.add(new_id)
        mapping.append({"old_id": old_id, "new_id": new_id})
    table = op.create_table("interaction_id_map", sa.Column("old_id", sa.BigInteger(), primary_key=True),
                            sa.Column("new_id", sa.BigInteger(), nullable=False))
    if mapping:
        op.bulk_insert(table, mapping)
    op.execute("UPDATE sample_interactions SET interaction_id = (SELECT new_id FROM interaction_id_map "
               "WHERE old_id = sample_interactions.interaction_id)")
    op.execute("UPDATE interactions SET id = (SELECT new_id FROM interaction_id_map WHERE old_id = interactions.id)")
    op.drop_table("interaction_id_map")


def _forget_plain_hashes() -> None:
    bind = op.get_bind()
    versions = sa.table("adapter_versions", sa.column("id", sa.Integer()), sa.column("shard", sa.Integer()),
                        sa.column("version", sa.Integer()), sa.column("manifest_sha256", sa.String()),
                        sa.column("metrics", sa.JSON()), sa.column("purged_at", sa.DateTime()))
    parts = sa.table("deletion_shards", sa.column("request_id", sa.String()), sa.column("shard", sa.Integer()),
                     sa.column("new_version", sa.Integer()), sa.column("new_manifest_sha256", sa.String()))
    requests = sa.table("deletion_requests", sa.column("id", sa.String()), sa.column("certificate", sa.JSON()))
    audit = sa.table("audit_log", sa.column("id", sa.Integer()), sa.column("action", sa.String()),
                     sa.column("detail", sa.JSON()))
    purged = bind.execute(sa.select(versions.c.shard, versions.c.version, versions.c.manifest_sha256,
                                    versions.c.metrics).where(versions.c.purged_at.is_not(None))).all()
    digests = {d for _, _, sha, metrics in purged for d in (sha, (metrics or {}).get("adapter_sha256")) if d}
    bind.execute(versions.update().where(versions.c.purged_at.is_not(None)).values(manifest_sha256=None, metrics={}))
    for shard, version, _, _ in purged:
        bind.execute(parts.update().where(parts.c.shard == shard, parts.c.new_version == version)
                     .values(new_manifest_sha256=None))
    for request_id, certificate in bind.execute(sa.select(requests.c.id, requests.c.certificate)
                                                .where(requests.c.certificate.is_not(None))).all():
        shards = [{**entry, "old_manifest_sha256": None, "old_manifest_hmac": None,
                   **{f: None for f in ("new_manifest_sha256", "new_adapter_sha256") if entry.get(f) in digests}}
                  for entry in certificate["shards"]]
        bind.execute(requests.update().where(requests.c.id == request_id)
                     .values(certificate={**certificate, "shards": shards}))
    for entry_id, detail in bind.execute(sa.select(audit.c.id, audit.c.detail)
                                         .where(audit.c.action == "shard.publish")).all():
        if "manifest_sha256" in (detail or {}):
            bind.execute(audit.update().where(audit.c.id == entry_id)
                         .values(detail={k: v for k, v in detail.items() if k != "manifest_sha256"}))


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.alter_column("manifest_sha256", existing_type=sa.String(length=64), nullable=True)
    with op.batch_alter_table("deletion_shards", schema=None) as batch_op:
        batch_op.alter_column("old_manifest_sha256", new_column_name="old_manifest_hmac",
                              existing_type=sa.String(length=64), existing_nullable=True)
    op.execute("UPDATE deletion_shards SET old_manifest_hmac = NULL")
    _forget_plain_hashes()
    if _postgresql():  # SQLite: Alembic's connection does not enforce foreign keys, the UPDATEs pass as they are
        op.drop_constraint(LINK_FK, "sample_interactions", type_="foreignkey")
        op.alter_column("interactions", "id", type_=sa.BigInteger(), server_default=None)
        op.execute("DROP SEQUENCE IF EXISTS interactions_id_seq")
        op.alter_column("sample_interactions", "interaction_id", type_=sa.BigInteger())
    _random_ids()
    if _postgresql():
        op.create_foreign_key(LINK_FK, "sample_interactions", "interactions", ["interaction_id"], ["id"],
                              ondelete="CASCADE")
        op.execute("CLUSTER interactions USING pk_interactions")


def downgrade() -> None:
    with op.batch_alter_table("deletion_shards", schema=None) as batch_op:  # 0003 held plain hashes: none kept
        batch_op.alter_column("old_manifest_hmac", new_column_name="old_manifest_sha256",
                              existing_type=sa.String(length=64), existing_nullable=True)
    op.execute("UPDATE deletion_shards SET old_manifest_sha256 = NULL")
    op.execute("UPDATE adapter_versions SET manifest_sha256 = '' WHERE manifest_sha256 IS NULL")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.alter_column("manifest_sha256", existing_type=sa.String(length=64), nullable=False)
    if _postgresql():  # the ids stay random and 64-bit; new rows take ids after the largest
        op.execute("CREATE SEQUENCE interactions_id_seq AS BIGINT OWNED BY interactions.id")
        op.execute("SELECT setval('interactions_id_seq', COALESCE((SELECT max(id) FROM interactions), 0) + 1, false)")
        op.alter_column("interactions", "id", server_default=sa.text("nextval('interactions_id_seq'::regclass)"))
