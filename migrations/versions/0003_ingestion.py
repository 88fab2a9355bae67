"""Online learning: ingested samples carry their prompts and content in the ledger, with when they were
ingested, prepared, claimed by a retrain and first trained; shards keep their semantic centre and the
error of a failed retrain for ingested data; ingestion requests keep their answer for idempotency.

Every new column is nullable: a ledger of today upgrades with its data as it is (its samples are the
run's, whose prompts stay in the run folder).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.add_column(sa.Column("ingested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("content", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("history_prompt", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("prepared_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("trained_version", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_samples_ingested_at"), ["ingested_at"], unique=False)
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("centre", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("ingest_error", sa.Text(), nullable=True))
    op.create_table(
        "ingestion_requests",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("subject_hmac", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("token_hmac", sa.String(length=64), nullable=True),
        sa.Column("idempotency_hmac", sa.String(length=64), nullable=True),
        sa.Column("answer", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_requests")),
        sa.UniqueConstraint("token_hmac", "idempotency_key", name="uq_ingestion_requests_idempotency"),
    )
    with op.batch_alter_table("ingestion_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingestion_requests_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("ingestion_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingestion_requests_created_at"))
    op.drop_table("ingestion_requests")
    with op.batch_alter_table("shards", schema=None) as batch_op:
        batch_op.drop_column("ingest_error")
        batch_op.drop_column("centre")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_samples_ingested_at"))
        batch_op.drop_column("trained_version")
        batch_op.drop_column("claimed_at")
        batch_op.drop_column("prepared_at")
        batch_op.drop_column("history_prompt")
        batch_op.drop_column("prompt")
        batch_op.drop_column("content")
        batch_op.drop_column("ingested_at")
