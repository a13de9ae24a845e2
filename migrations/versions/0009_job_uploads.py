"""Each upload's own record: ``job_uploads`` and ``evaluation_items.input_sha256``.

One job certifies one tensor, but different files can give the same tensor (the first frame
of an animated WebP, and that frame saved as a PNG) with different preprocessing and
warnings. ``jobs.input_record`` stays the record of the upload that made the job; each other
upload that reached the job keeps its own record in ``job_uploads`` (one row per job and
uploaded bytes), and an evaluation item names the bytes it came from (null for items made
before this revision: the job's own record, as before). Existing rows are kept as they are.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_uploads",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("input_sha256", sa.String(length=64), nullable=False),
        sa.Column("input_record", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_uploads_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "input_sha256", name=op.f("pk_job_uploads")),
    )
    # Plain ADD COLUMN (nullable, no default), never batch mode: see 0003.
    op.add_column(
        "evaluation_items", sa.Column("input_sha256", sa.String(length=64), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("evaluation_items", "input_sha256")  # SQLite >= 3.35
    op.drop_table("job_uploads")
