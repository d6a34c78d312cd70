"""expert studies: named readers, overlap, and a review project of each study's own

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-08 18:00:00

``studies`` holds a study's readers (Label Studio e-mails), overlap, criteria set, batches, the
origin question's flag and margin, and its status. A review project may belong to a study
(``review_projects.study_id``); the one-project-per-criteria-set-and-interface rule then holds
for the shared projects only (a partial unique index where ``study_id`` is null), so a study gets its own
project under a criteria set that already has one.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHARED = sa.text("study_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("criteria_set_id", sa.Integer(), nullable=False),
        sa.Column("readers", sa.JSON(), nullable=False),
        sa.Column("overlap", sa.Integer(), nullable=False),
        sa.Column("batch_ids", sa.JSON(), nullable=False),
        sa.Column("ask_origin", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "open", "complete", name="status", native_enum=False, create_constraint=True,
                length=32,
            ),
            nullable=False,
            server_default="open",
        ),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("overlap >= 1", name=op.f("ck_studies_overlap_positive")),
        sa.ForeignKeyConstraint(
            ["criteria_set_id"],
            ["criteria_sets.id"],
            name=op.f("fk_studies_criteria_set_id_criteria_sets"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
    )
    op.create_index(op.f("ix_studies_domain"), "studies", ["domain"])
    op.create_index(op.f("ix_studies_criteria_set_id"), "studies", ["criteria_set_id"])
    with op.batch_alter_table("review_projects") as batch:
        batch.add_column(sa.Column("study_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_review_projects_study_id_studies"),
            "studies",
            ["study_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_unique_constraint(op.f("uq_review_projects_study_id"), ["study_id"])
        batch.drop_constraint(
            op.f("uq_review_projects_criteria_set_id_origin_question"), type_="unique"
        )
    op.create_index(
        "uq_review_projects_shared_criteria_set",
        "review_projects",
        ["criteria_set_id", "origin_question"],
        unique=True,
        sqlite_where=SHARED,
        postgresql_where=SHARED,
    )


def downgrade() -> None:
    # a study's project and what was reviewed in it go with the study
    op.execute(
        sa.text(
            "DELETE FROM reviews WHERE task_id IN (SELECT t.id FROM review_tasks t JOIN "
            "review_projects p ON t.project_id = p.id WHERE p.study_id IS NOT NULL)"
        )
    )
    op.execute(
        sa.text(
            "DELETE FROM review_tasks WHERE project_id IN (SELECT id FROM review_projects "
            "WHERE study_id IS NOT NULL)"
        )
    )
    op.execute(sa.text("DELETE FROM review_projects WHERE study_id IS NOT NULL"))
    op.drop_index("uq_review_projects_shared_criteria_set", table_name="review_projects")
    with op.batch_alter_table("review_projects") as batch:
        batch.create_unique_constraint(
            op.f("uq_review_projects_criteria_set_id_origin_question"),
            ["criteria_set_id", "origin_question"],
        )
        batch.drop_constraint(op.f("uq_review_projects_study_id"), type_="unique")
        batch.drop_constraint(op.f("fk_review_projects_study_id_studies"), type_="foreignkey")
        batch.drop_column("study_id")
    op.drop_index(op.f("ix_studies_criteria_set_id"), table_name="studies")
    op.drop_index(op.f("ix_studies_domain"), table_name="studies")
    op.drop_table("studies")
