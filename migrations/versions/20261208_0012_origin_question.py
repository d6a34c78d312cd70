"""origin question: "real or synthetic?" asked in a review project, answered per verdict

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 18:00:00

``review_projects.origin_question`` says the project's labelling interface also asks "real or
synthetic?" with a confidence; Label Studio's interface is per project, so a criteria set may
now have two projects (one with the question, one without): the unique key moves from
``criteria_set_id`` to (``criteria_set_id``, ``origin_question``). Existing projects do not ask
it. ``reviews.answered_synthetic`` and ``reviews.origin_confidence`` (1 guessing, 2 fairly sure,
3 sure) hold a verdict's answer; null where the question was not asked or not answered.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("review_projects") as batch:
        batch.add_column(
            sa.Column("origin_question", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.drop_constraint(op.f("uq_review_projects_criteria_set_id"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_review_projects_criteria_set_id_origin_question"),
            ["criteria_set_id", "origin_question"],
        )
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("answered_synthetic", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("origin_confidence", sa.Integer(), nullable=True))
        batch.create_check_constraint("origin_confidence", "origin_confidence BETWEEN 1 AND 3")


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_constraint(op.f("ck_reviews_origin_confidence"), type_="check")
        batch.drop_column("origin_confidence")
        batch.drop_column("answered_synthetic")
    # a criteria set goes back to one project: the projects that asked the question go, with
    # their tasks and verdicts (their answers have nowhere to go)
    op.execute(
        sa.text(
            "DELETE FROM reviews WHERE task_id IN (SELECT t.id FROM review_tasks t JOIN "
            "review_projects p ON t.project_id = p.id WHERE p.origin_question)"
        )
    )
    op.execute(
        sa.text(
            "DELETE FROM review_tasks WHERE project_id IN (SELECT id FROM review_projects "
            "WHERE origin_question)"
        )
    )
    op.execute(sa.text("DELETE FROM review_projects WHERE origin_question"))
    with op.batch_alter_table("review_projects") as batch:
        batch.drop_constraint(
            op.f("uq_review_projects_criteria_set_id_origin_question"), type_="unique"
        )
        batch.create_unique_constraint(
            op.f("uq_review_projects_criteria_set_id"), ["criteria_set_id"]
        )
        batch.drop_column("origin_question")
