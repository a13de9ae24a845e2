"""Input fidelity: a job's tensor sha256 (its identity) and the record of its preprocessing.

``jobs.tensor_sha256`` is the sha256 of the preprocessed float32 tensor; for jobs made before
this revision it is computed from the stored tensor (``job_inputs.data``, the same bytes).
``jobs.input_record`` holds original_size, scale, preprocessing steps and warnings (``{}`` for
older jobs, whose preprocessing was not recorded). Request keys of older jobs are left as they
were: they were keyed on the uploaded bytes and an older preprocessing, so a new submission of
the same file is a new input.

Revision ID: 0003
Revises: 0002
Create Date: 2026-01-20
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BACKFILL_CHUNK = 200


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite supports it with a constant default), never batch mode: on SQLite
    # batch mode recreates the table, and dropping ``jobs`` with foreign keys on would cascade
    # to every job input and certificate.
    op.add_column(
        "jobs", sa.Column("tensor_sha256", sa.String(length=64), server_default="", nullable=False)
    )
    op.add_column(
        "jobs", sa.Column("input_record", sa.JSON(), server_default=sa.text("'{}'"), nullable=False)
    )
    conn = op.get_bind()
    inputs = sa.table("job_inputs", sa.column("job_id", sa.String), sa.column("data"))
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("tensor_sha256", sa.String))
    ids = [row[0] for row in conn.execute(sa.select(inputs.c.job_id)).fetchall()]
    for start in range(0, len(ids), BACKFILL_CHUNK):  # bounded memory: tensors can be large
        chunk = ids[start : start + BACKFILL_CHUNK]
        rows = conn.execute(
            sa.select(inputs.c.job_id, inputs.c.data).where(inputs.c.job_id.in_(chunk))
        ).fetchall()
        for job_id, data in rows:
            digest = hashlib.sha256(bytes(data)).hexdigest()
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(tensor_sha256=digest))


def downgrade() -> None:
    op.drop_column("jobs", "input_record")  # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35)
    op.drop_column("jobs", "tensor_sha256")
