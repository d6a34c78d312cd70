"""guidance sweeps: the ``sweeps`` table, ``batches.sweep_id`` and ``models.guidance_defaults``

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 23:30:00

A sweep is one batch per (class, guidance scale) of a model, reviewed together; the scale each
class is most plausible at becomes the model's per-class default (nullable JSON: models made
before have none and keep the global default).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("scales", sa.JSON(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("scheduler", sa.String(length=32), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("n >= 1", name=op.f("ck_sweeps_n_positive")),
        sa.CheckConstraint("steps >= 1", name=op.f("ck_sweeps_steps_positive")),
        sa.ForeignKeyConstraint(
            ["model_id"],
            ["models.id"],
            name=op.f("fk_sweeps_model_id_models"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index(op.f("ix_sweeps_model_id"), "sweeps", ["model_id"], unique=False)
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("sweep_id", sa.Integer(), nullable=True))
        batch.create_index(batch.f("ix_batches_sweep_id"), ["sweep_id"], unique=False)
        batch.create_foreign_key(
            batch.f("fk_batches_sweep_id_sweeps"), "sweeps", ["sweep_id"], ["id"],
            ondelete="SET NULL",
        )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("guidance_defaults", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("guidance_defaults")
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint(batch.f("fk_batches_sweep_id_sweeps"), type_="foreignkey")
        batch.drop_index(batch.f("ix_batches_sweep_id"))
        batch.drop_column("sweep_id")
    op.drop_index(op.f("ix_sweeps_model_id"), table_name="sweeps")
    op.drop_table("sweeps")
