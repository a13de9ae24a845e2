"""Signed certificates and replays: where a job's seed came from, and replay jobs.

``jobs.seed_source`` is ``derived`` or ``client`` ("" for jobs made before it was recorded);
``jobs.replay_of`` names the job a replay re-runs and ``jobs.replay_result`` holds what the
replay found (counts identical or not). The index on (owner_id, tensor_sha256) serves a new
certificate's ``prior_runs`` count. Certificates stored before this revision keep their bodies
as they were (unsigned).

Revision ID: 0004
Revises: 0003
Create Date: 2026-01-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode: on SQLite batch mode recreates ``jobs``, and dropping
    # it with foreign keys on would cascade to every job input and certificate.
    op.add_column(
        "jobs", sa.Column("seed_source", sa.String(length=8), server_default="", nullable=False)
    )
    op.add_column("jobs", sa.Column("replay_of", sa.String(length=36), nullable=True))
    op.add_column("jobs", sa.Column("replay_result", sa.JSON(), nullable=True))
    op.create_index(op.f("ix_jobs_replay_of"), "jobs", ["replay_of"])
    op.create_index("ix_jobs_owner_tensor", "jobs", ["owner_id", "tensor_sha256"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_tensor", table_name="jobs")
    op.drop_index(op.f("ix_jobs_replay_of"), table_name="jobs")
    op.drop_column("jobs", "replay_result")  # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35)
    op.drop_column("jobs", "replay_of")
    op.drop_column("jobs", "seed_source")
