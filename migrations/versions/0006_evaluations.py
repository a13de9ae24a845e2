"""Evaluations: a test set certified through the service, one job per image.

``evaluations`` holds what was asked (source, model, parameters, skip/max) and
``evaluation_items`` links each image (its dataset index, name and label) to the job that
certifies it. The link is a table of its own, not a column of ``jobs``: re-submitting an
evaluation re-uses the finished jobs of the first, so one job may belong to several
evaluations. Nothing in ``jobs`` changes (no batch mode: on SQLite it would recreate ``jobs``
and cascade to every input and certificate).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=True),
        sa.Column("mode", sa.String(length=20), nullable=False),
        sa.Column("checkpoint_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=200), nullable=False),
        sa.Column("classes", sa.JSON(), nullable=False),
        sa.Column("sigma", sa.Float(), nullable=False),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("n0", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("target_radius", sa.Float(), nullable=True),
        sa.Column("time_budget_s", sa.Float(), nullable=True),
        sa.Column("skip", sa.Integer(), nullable=False),
        sa.Column("max_images", sa.Integer(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("cancelled_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["api_keys.id"],
            name=op.f("fk_evaluations_owner_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["checkpoint_id"],
            ["checkpoints.id"],
            name=op.f("fk_evaluations_checkpoint_id_checkpoints"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(
        "ix_evaluations_owner_created", "evaluations", ["owner_id", "created_at"], unique=False
    )
    op.create_table(
        "evaluation_items",
        sa.Column("evaluation_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["evaluation_id"],
            ["evaluations.id"],
            name=op.f("fk_evaluation_items_evaluation_id_evaluations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_evaluation_items_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("evaluation_id", "position", name=op.f("pk_evaluation_items")),
    )
    op.create_index(
        op.f("ix_evaluation_items_job_id"), "evaluation_items", ["job_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluation_items_job_id"), table_name="evaluation_items")
    op.drop_table("evaluation_items")
    op.drop_index("ix_evaluations_owner_created", table_name="evaluations")
    op.drop_table("evaluations")
