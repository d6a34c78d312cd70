"""reviews.reviewer_email: the reviewer's e-mail beside the Label Studio user id, so the
report's reviewer filter takes either

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 16:30:00

Rows stored before held the e-mail in ``reviewer`` when Label Studio sent one: it is copied
over. The next pull rewrites every verdict with both (id in ``reviewer``, e-mail beside it).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.add_column(sa.Column("reviewer_email", sa.String(length=254), nullable=True))
        batch.create_index(op.f("ix_reviews_reviewer_email"), ["reviewer_email"])
    op.execute("UPDATE reviews SET reviewer_email = reviewer WHERE reviewer LIKE '%@%'")


def downgrade() -> None:
    with op.batch_alter_table("reviews") as batch:
        batch.drop_index(op.f("ix_reviews_reviewer_email"))
        batch.drop_column("reviewer_email")
