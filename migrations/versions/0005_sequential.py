"""Sequential decisions, time budgets and training recipes.

``jobs.target_radius`` is the radius a ``decide`` job tests ("is x certified at r?");
``jobs.time_budget_s`` the optional time budget of a ``certify`` job. Both are null for every
other job, including all jobs made before this revision. ``checkpoints.recipe`` names how a
model was trained (``dmae+consistency``, ``scratch+gaussian``, ...), null when unknown.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode (on SQLite it would recreate ``jobs`` and cascade).
    op.add_column("jobs", sa.Column("target_radius", sa.Float(), nullable=True))
    op.add_column("jobs", sa.Column("time_budget_s", sa.Float(), nullable=True))
    op.add_column("checkpoints", sa.Column("recipe", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("checkpoints", "recipe")
    op.drop_column("jobs", "time_budget_s")  # ALTER TABLE ... DROP COLUMN (SQLite >= 3.35)
    op.drop_column("jobs", "target_radius")
