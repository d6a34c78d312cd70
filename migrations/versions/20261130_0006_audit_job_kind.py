"""jobs.kind: the ``audit`` job (memorisation audit of a batch)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 19:30:00

Job kinds are VARCHAR + CHECK (``service.db.models.str_enum``), so a new kind is a constraint
change, as the viewer role was in 0004.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KINDS = ("train", "sample", "prototypes", "evaluate", "review_sync")
NEW_KINDS = (*OLD_KINDS, "audit")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", NEW_KINDS))


def downgrade() -> None:
    # Audit jobs cannot exist under the old constraint; their results go with them.
    op.execute("DELETE FROM jobs WHERE kind = 'audit'")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(op.f("ck_jobs_kind"), type_="check")
        batch.create_check_constraint("kind", _in("kind", OLD_KINDS))
