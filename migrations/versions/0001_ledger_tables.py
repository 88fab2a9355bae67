"""Ledger tables: run, items, interactions, samples and their links, shards, adapter versions,
deletion requests with their shards and events, forgotten HMACs and the audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-27 21:59:51.430155
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_table(
        "deletion_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("subject_hmac", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("token_hmac", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("affected_shards", sa.JSON(), nullable=False),
        sa.Column("interactions_removed", sa.Integer(), nullable=False),
        sa.Column("samples_removed", sa.Integer(), nullable=False),
        sa.Column("deleted_hmacs", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("certificate", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_requests")),
    )
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.create_index("ix_deletion_requests_idempotency", ["token_hmac", "idempotency_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_deletion_requests_status"), ["status"], unique=False)

    op.create_table(
        "items",
        sa.Column("item_id", sa.String(length=200), nullable=False),
        sa.Column("title", sa.String(length=1024), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name=op.f("pk_items")),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("dataset", sa.String(length=256), nullable=False),
        sa.Column("shards", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("base_model_name", sa.String(length=256), nullable=False),
        sa.Column("base_model_sha256", sa.String(length=64), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_table(
        "shards",
        sa.Column("shard", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("serving_version", sa.Integer(), nullable=True),
        sa.Column("dirty_seq", sa.Integer(), nullable=False),
        sa.Column("clean_seq", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("shard", name=op.f("pk_shards")),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("n_samples", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("covers_seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("served_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["shard"], ["shards.shard"], name=op.f("fk_adapter_versions_shard_shards")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.create_index("ix_adapter_versions_shard_version", ["shard", "version"], unique=True)

    op.create_table(
        "deletion_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["deletion_requests.id"], name=op.f("fk_deletion_events_request_id_deletion_requests")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_events")),
    )
    with op.batch_alter_table("deletion_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_deletion_events_request_id"), ["request_id"], unique=False)

    op.create_table(
        "deletion_shards",
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("old_version", sa.Integer(), nullable=True),
        sa.Column("old_manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("new_version", sa.Integer(), nullable=True),
        sa.Column("new_manifest_sha256", sa.String(length=64), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["deletion_requests.id"], name=op.f("fk_deletion_shards_request_id_deletion_requests")
        ),
        sa.ForeignKeyConstraint(["shard"], ["shards.shard"], name=op.f("fk_deletion_shards_shard_shards")),
        sa.PrimaryKeyConstraint("request_id", "shard", name=op.f("pk_deletion_shards")),
    )
    op.create_table(
        "forgotten",
        sa.Column("hmac", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["deletion_requests.id"], name=op.f("fk_forgotten_request_id_deletion_requests")
        ),
        sa.PrimaryKeyConstraint("hmac", name=op.f("pk_forgotten")),
    )
    with op.batch_alter_table("forgotten", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_forgotten_request_id"), ["request_id"], unique=False)

    op.create_table(
        "interactions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("item_id", sa.String(length=200), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("timestamp", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deletion_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["deletion_id"], ["deletion_requests.id"], name=op.f("fk_interactions_deletion_id_deletion_requests")
        ),
        sa.ForeignKeyConstraint(["item_id"], ["items.item_id"], name=op.f("fk_interactions_item_id_items")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interactions")),
        sa.UniqueConstraint("key", name=op.f("uq_interactions_key")),
    )
    with op.batch_alter_table("interactions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_interactions_deletion_id"), ["deletion_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_interactions_item_id"), ["item_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_interactions_user_id"), ["user_id"], unique=False)

    op.create_table(
        "samples",
        sa.Column("sample_id", sa.String(length=200), nullable=False),
        sa.Column("user_id", sa.String(length=200), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=True),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deletion_id", sa.String(length=36), nullable=True),
        sa.ForeignKeyConstraint(
            ["deletion_id"], ["deletion_requests.id"], name=op.f("fk_samples_deletion_id_deletion_requests")
        ),
        sa.PrimaryKeyConstraint("sample_id", name=op.f("pk_samples")),
    )
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_samples_deletion_id"), ["deletion_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_samples_shard"), ["shard"], unique=False)
        batch_op.create_index(batch_op.f("ix_samples_user_id"), ["user_id"], unique=False)

    op.create_table(
        "sample_interactions",
        sa.Column("sample_id", sa.String(length=200), nullable=False),
        sa.Column("interaction_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["interaction_id"],
            ["interactions.id"],
            name=op.f("fk_sample_interactions_interaction_id_interactions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sample_id"],
            ["samples.sample_id"],
            name=op.f("fk_sample_interactions_sample_id_samples"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sample_id", "interaction_id", name=op.f("pk_sample_interactions")),
    )
    with op.batch_alter_table("sample_interactions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_interactions_interaction_id"), ["interaction_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("sample_interactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_interactions_interaction_id"))

    op.drop_table("sample_interactions")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_samples_user_id"))
        batch_op.drop_index(batch_op.f("ix_samples_shard"))
        batch_op.drop_index(batch_op.f("ix_samples_deletion_id"))

    op.drop_table("samples")
    with op.batch_alter_table("interactions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_interactions_user_id"))
        batch_op.drop_index(batch_op.f("ix_interactions_item_id"))
        batch_op.drop_index(batch_op.f("ix_interactions_deletion_id"))

    op.drop_table("interactions")
    with op.batch_alter_table("forgotten", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forgotten_request_id"))

    op.drop_table("forgotten")
    op.drop_table("deletion_shards")
    with op.batch_alter_table("deletion_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deletion_events_request_id"))

    op.drop_table("deletion_events")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_adapter_versions_shard_version")

    op.drop_table("adapter_versions")
    op.drop_table("shards")
    op.drop_table("runs")
    op.drop_table("items")
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deletion_requests_status"))
        batch_op.drop_index("ix_deletion_requests_idempotency")

    op.drop_table("deletion_requests")
    op.drop_table("audit_log")
