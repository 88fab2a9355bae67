"""Idempotency keys bind their request: an HMAC of the user and items beside the key, and one request
per (token, key) as a unique constraint (it replaces the plain index), so concurrent reuses of a key
cannot create two requests.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 07:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("idempotency_hmac", sa.String(length=64), nullable=True))
        batch_op.drop_index("ix_deletion_requests_idempotency")
    # Requests made before this revision: only the first request per (token, key) keeps its key.
    op.execute(sa.text(
        "UPDATE deletion_requests SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL AND EXISTS ("
        "SELECT 1 FROM deletion_requests AS older WHERE older.token_hmac = deletion_requests.token_hmac "
        "AND older.idempotency_key = deletion_requests.idempotency_key "
        "AND older.created_at < deletion_requests.created_at)"))
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.create_unique_constraint("uq_deletion_requests_idempotency", ["token_hmac", "idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("deletion_requests", schema=None) as batch_op:
        batch_op.drop_constraint("uq_deletion_requests_idempotency", type_="unique")
        batch_op.create_index("ix_deletion_requests_idempotency", ["token_hmac", "idempotency_key"], unique=False)
        batch_op.drop_column("idempotency_hmac")
