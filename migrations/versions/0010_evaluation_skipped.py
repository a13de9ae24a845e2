"""The members of an evaluation's test set that were not certified, with their reasons.

A file of an uploaded archive or a server dataset that is not a supported image (``.avif``,
``.heic``, a damaged file, a file outside the ImageFolder layout) used to vanish from the set
without a word. Now it refuses the evaluation, or with ``skip_invalid`` is skipped and listed
in ``evaluations.skipped`` (a JSON list of ``{"name", "reason"}``). Existing rows are kept and
get an empty list: what they skipped was never recorded.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode (on SQLite it would recreate the table and cascade).
    op.add_column(
        "evaluations",
        sa.Column("skipped", sa.JSON(), server_default=sa.text("'[]'"), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("evaluations", "skipped")
