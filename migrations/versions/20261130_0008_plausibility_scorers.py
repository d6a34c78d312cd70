"""plausibility scorers learnt from expert verdicts (issue 14, section 2)

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 23:20:00

- ``scorers``: one row per trained scorer version of a review domain (its weights in storage).
- ``jobs.kind`` admits ``score`` (train a domain's scorer).
- ``batches.scorer_id`` / ``drawn`` / ``filter``: the scorer a batch was scored (and perhaps
  filtered) with and how many images were drawn to keep ``n``.
- ``images.score``: that scorer's probability that the image is plausible.
- ``review_tasks.sample``: ``random`` (a simple random sample of its batch: counts in the
  plausibility rates) or ``uncertain`` (chosen because the scorer was unsure: trains the scorer,
  kept out of the rates). Existing tasks were all sent whole batches: ``random``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ("train", "sample", "prototypes", "evaluate", "review_sync", "audit")
NEW_KINDS = (*OLD_KINDS, "score")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    op.create_table(
        "scorers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("encoder", sa.String(length=300), nullable=False),
        sa.Column("artefact_key", sa.String(length=1024), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("n_plausible", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_scorers_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scorers")),
        sa.UniqueConstraint("domain", "version", name=op.f("uq_scorers_domain_version")),
    )
    op.create_index(op.f("ix_scorers_domain"), "scorers", ["domain"], unique=False)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", NEW_KINDS))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("scorer_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("drawn", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("filter", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_batches_scorer_id_scorers"), "scorers", ["scorer_id"], ["id"],
            ondelete="SET NULL",
        )
        batch.create_index(op.f("ix_batches_scorer_id"), ["scorer_id"], unique=False)
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))
    with op.batch_alter_table("review_tasks") as batch:
        batch.add_column(
            sa.Column("sample", sa.String(length=32), server_default="random", nullable=False)
        )
        batch.create_check_constraint("sample", "sample IN ('random', 'uncertain')")


def downgrade() -> None:
    with op.batch_alter_table("review_tasks") as batch:
        batch.drop_constraint(op.f("ck_review_tasks_sample"), type_="check")
        batch.drop_column("sample")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("score")
    with op.batch_alter_table("batches") as batch:
        batch.drop_index(op.f("ix_batches_scorer_id"))
        batch.drop_constraint(op.f("fk_batches_scorer_id_scorers"), type_="foreignkey")
        batch.drop_column("filter")
        batch.drop_column("drawn")
        batch.drop_column("scorer_id")
    # Scorer jobs cannot exist under the old constraint; their results go with them.
    op.execute("DELETE FROM jobs WHERE kind = 'score'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", OLD_KINDS))
    op.drop_index(op.f("ix_scorers_domain"), table_name="scorers")
    op.drop_table("scorers")
