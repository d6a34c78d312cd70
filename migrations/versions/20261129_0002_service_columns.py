"""service columns: dataset source/archive/domain, model classes, job liveness and cancel

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 04:40:00

Written by hand and checked against the ORM with ``compare_metadata`` (tests/test_migrations).
``models.status`` gains ``cancelled``: the CHECK constraint is dropped and recreated (batch mode
copies the table on SQLite).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_MODEL_STATUS = ("pending", "training", "ready", "failed")
NEW_MODEL_STATUS = (*OLD_MODEL_STATUS, "cancelled")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(
            sa.Column("source", sa.String(length=32), nullable=False, server_default="folder")
        )
        batch.add_column(sa.Column("archive_key", sa.String(length=1024), nullable=True))
        batch.add_column(sa.Column("domain", sa.String(length=64), nullable=True))
        batch.create_check_constraint("source", _in("source", ("folder", "upload")))
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("classes", sa.JSON(), nullable=False, server_default="[]"))
        batch.drop_constraint(op.f("ck_models_status"), type_="check")
        batch.create_check_constraint("status", _in("status", NEW_MODEL_STATUS))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("worker", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # The server defaults only filled existing rows; the ORM sets these columns itself.
    with op.batch_alter_table("datasets") as batch:
        batch.alter_column("source", server_default=None)
    with op.batch_alter_table("models") as batch:
        batch.alter_column("classes", server_default=None)


def downgrade() -> None:
    op.execute("UPDATE models SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cancel_requested")
        batch.drop_column("heartbeat_at")
        batch.drop_column("worker")
        batch.drop_column("attempts")
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint(op.f("ck_models_status"), type_="check")
        batch.create_check_constraint("status", _in("status", OLD_MODEL_STATUS))
        batch.drop_column("classes")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_constraint(op.f("ck_datasets_source"), type_="check")
        batch.drop_column("domain")
        batch.drop_column("archive_key")
        batch.drop_column("source")
