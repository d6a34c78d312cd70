"""review controls: real held-out images reviewed blinded beside synthetic ones

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08 12:00:00

A batch may be a control batch (``batches.source`` = ``control``): real images of one class
copied from a dataset's held-out part, with no model (``model_id`` becomes nullable) but a
``dataset_id``, and ``control`` recording how they were chosen. Existing batches are
``generated``. ``ck_batches_source_origin`` ties the two: a generated batch has a model, a
control batch has a dataset and no model.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORIGIN = (
    "(source = 'control' AND model_id IS NULL AND dataset_id IS NOT NULL) OR "
    "(source = 'generated' AND model_id IS NOT NULL)"
)


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("source", sa.String(length=32), nullable=False, server_default="generated")
        )
        batch.add_column(sa.Column("dataset_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("control", sa.JSON(), nullable=True))
        batch.alter_column("model_id", existing_type=sa.Integer(), nullable=True)
        batch.create_foreign_key(
            op.f("fk_batches_dataset_id_datasets"),
            "datasets",
            ["dataset_id"],
            ["id"],
            ondelete="RESTRICT",
        )
        batch.create_index(op.f("ix_batches_dataset_id"), ["dataset_id"])
        batch.create_check_constraint("source", "source IN ('generated', 'control')")
        batch.create_check_constraint("source_origin", ORIGIN)


def downgrade() -> None:
    # a control batch has no model to go back to: it goes, with its images and their tasks
    op.execute(
        sa.text(
            "DELETE FROM reviews WHERE task_id IN (SELECT t.id FROM review_tasks t JOIN images i "
            "ON t.image_id = i.id JOIN batches b ON i.batch_id = b.id WHERE b.source = 'control')"
        )
    )
    op.execute(
        sa.text(
            "DELETE FROM review_tasks WHERE image_id IN (SELECT i.id FROM images i JOIN batches b "
            "ON i.batch_id = b.id WHERE b.source = 'control')"
        )
    )
    op.execute(
        sa.text(
            "DELETE FROM images WHERE batch_id IN (SELECT id FROM batches WHERE source = 'control')"
        )
    )
    op.execute(sa.text("DELETE FROM batches WHERE source = 'control'"))
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint(op.f("ck_batches_source_origin"), type_="check")
        batch.drop_constraint(op.f("ck_batches_source"), type_="check")
        batch.drop_index(op.f("ix_batches_dataset_id"))
        batch.drop_constraint(op.f("fk_batches_dataset_id_datasets"), type_="foreignkey")
        batch.alter_column("model_id", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("control")
        batch.drop_column("dataset_id")
        batch.drop_column("source")
