"""The default model of each sigma: an explicit flag instead of the newest active model.

A request with a sigma and no model used to run on the newest active classifier of that sigma,
so registering a model (or a training run finishing) silently took that sigma's traffic. Now
``checkpoints.is_default`` marks the one model a sigma's requests use, set only deliberately;
``training_runs.make_default`` records whether a run's result is to become the default. At most
one default per sigma (a partial unique index). Existing rows are kept, and so is where today's
traffic goes: each sigma's newest active classifier (the model requests ran on) becomes its
default.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT = "is_default"


def upgrade() -> None:
    # Plain ADD COLUMN, never batch mode (on SQLite it would recreate the table and cascade).
    op.add_column(
        "checkpoints",
        sa.Column("is_default", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "training_runs",
        sa.Column("make_default", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    table = sa.table(
        "checkpoints",
        sa.column("id", sa.Integer),
        sa.column("sigma", sa.Float),
        sa.column("kind", sa.String),
        sa.column("active", sa.Boolean),
        sa.column("is_default", sa.Boolean),
    )
    newest = (
        sa.select(sa.func.max(table.c.id))
        .where(table.c.active.is_(True), table.c.kind == "classifier", table.c.sigma.isnot(None))
        .group_by(table.c.sigma)
    )
    op.execute(table.update().where(table.c.id.in_(newest)).values(is_default=True))
    op.create_index(
        "ux_checkpoints_default_sigma",
        "checkpoints",
        ["sigma"],
        unique=True,
        postgresql_where=sa.text(DEFAULT),
        sqlite_where=sa.text(DEFAULT),
    )


def downgrade() -> None:
    op.drop_index("ux_checkpoints_default_sigma", table_name="checkpoints")
    op.drop_column("training_runs", "make_default")
    op.drop_column("checkpoints", "is_default")
