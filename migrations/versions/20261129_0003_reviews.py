"""reviews: criteria sets, Label Studio projects and tasks, reviewer verdicts; job kind
review_sync

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29 05:00:00
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ("train", "sample", "prototypes", "evaluate")
NEW_KINDS = (*OLD_KINDS, "review_sync")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _created_at() -> sa.Column[datetime]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "criteria_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_criteria_sets")),
        sa.UniqueConstraint("domain", "version", name=op.f("uq_criteria_sets_domain_version")),
    )
    op.create_index(op.f("ix_criteria_sets_domain"), "criteria_sets", ["domain"])
    op.create_table(
        "review_projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("criteria_set_id", sa.Integer(), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=True),
        sa.Column("ls_webhook_id", sa.Integer(), nullable=True),
        sa.Column("last_pulled_at", sa.DateTime(timezone=True), nullable=True),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["criteria_set_id"], ["criteria_sets.id"], ondelete="RESTRICT",
            name=op.f("fk_review_projects_criteria_set_id_criteria_sets"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_projects")),
        sa.UniqueConstraint("criteria_set_id", name=op.f("uq_review_projects_criteria_set_id")),
    )
    op.create_table(
        "review_tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=True),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], ondelete="CASCADE",
            name=op.f("fk_review_tasks_image_id_images"),
        ),
        sa.ForeignKeyConstraint(
            ["project_id"], ["review_projects.id"], ondelete="CASCADE",
            name=op.f("fk_review_tasks_project_id_review_projects"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_review_tasks")),
        sa.UniqueConstraint("ls_task_id", name=op.f("uq_review_tasks_ls_task_id")),
        sa.UniqueConstraint("project_id", "image_id", name=op.f("uq_review_tasks_project_id_image_id")),
        sa.UniqueConstraint("token", name=op.f("uq_review_tasks_token")),
    )
    op.create_index(op.f("ix_review_tasks_image_id"), "review_tasks", ["image_id"])
    op.create_index(op.f("ix_review_tasks_project_id"), "review_tasks", ["project_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=False),
        sa.Column("plausible", sa.Boolean(), nullable=False),
        sa.Column("overall", sa.String(length=32), nullable=True),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        _created_at(),
        sa.ForeignKeyConstraint(
            ["task_id"], ["review_tasks.id"], ondelete="CASCADE",
            name=op.f("fk_reviews_task_id_review_tasks"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
        sa.UniqueConstraint("ls_annotation_id", name=op.f("uq_reviews_ls_annotation_id")),
    )
    op.create_index(op.f("ix_reviews_reviewer"), "reviews", ["reviewer"])
    op.create_index(op.f("ix_reviews_task_id"), "reviews", ["task_id"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", NEW_KINDS))


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'review_sync'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", OLD_KINDS))
    op.drop_table("reviews")
    op.drop_table("review_tasks")
    op.drop_table("review_projects")
    op.drop_table("criteria_sets")
