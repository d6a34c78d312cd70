"""verdict provenance: incomplete verdicts, who wrote a verdict, odd tasks, import intent

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 20:00:00

``reviews.plausible`` becomes nullable: an annotation without a recognised verdict is stored as
incomplete (None) and never counted, instead of plausible. ``reviews.written_by`` and
``reviews.flagged`` keep who Label Studio says wrote the annotation and whether that is someone
other than its named author (verdicts stored before have no writer recorded and are not
flagged: the next pull sets both). ``review_projects.odd_tasks`` lists the Label Studio tasks
the last pull did not count; ``review_tasks.import_after`` records that an import of the task
was sent (and the highest Label Studio task id before it), so a crash between the import and
its commit can be recovered without adopting a task protomed did not create;
``review_tasks.edited`` says what a member changed of the task's data (its verdicts count
nowhere while it is set).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.alter_column("plausible", existing_type=sa.Boolean(), nullable=True)
        batch.add_column(sa.Column("written_by", sa.String(length=200), nullable=True))
        batch.add_column(
            sa.Column("flagged", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    with op.batch_alter_table("review_projects") as batch:
        batch.add_column(sa.Column("odd_tasks", sa.JSON(), nullable=True))
    with op.batch_alter_table("review_tasks") as batch:
        batch.add_column(sa.Column("import_after", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("edited", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("review_tasks") as batch:
        batch.drop_column("edited")
        batch.drop_column("import_after")
    with op.batch_alter_table("review_projects") as batch:
        batch.drop_column("odd_tasks")
    # an incomplete verdict has no plausible/implausible value to go back to: it goes
    op.execute(sa.text("DELETE FROM reviews WHERE plausible IS NULL"))
    with op.batch_alter_table("reviews") as batch:
        batch.drop_column("flagged")
        batch.drop_column("written_by")
        batch.alter_column("plausible", existing_type=sa.Boolean(), nullable=False)
