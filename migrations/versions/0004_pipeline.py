"""Pipeline results and the worklist: series routing columns, detector scores per series version and
model version, worklist items, users.

Revision ID: 0004_pipeline
Revises: 0003_export
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_pipeline"
down_revision: str | None = "0003_export"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:  # batch: SQLite cannot ALTER in place
        batch.add_column(sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("route", sa.String(16), nullable=True))
        batch.add_column(sa.Column("route_reason", sa.String(32), nullable=True))
    op.create_table(
        "series_score",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("slices", sa.JSON(), nullable=False),
        sa.Column("top_slices", sa.JSON(), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_series_score_series_id_series"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_series_score")),
        # one result per series version and detector version: a redelivered task finds it
        sa.UniqueConstraint("series_id", "model_version", name=op.f("uq_series_score_series_id_model_version")),
    )
    op.create_index(op.f("ix_series_score_series_id"), "series_score", ["series_id"])
    op.create_table(
        "app_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_app_user")),
        sa.UniqueConstraint("name", name=op.f("uq_app_user_name")),
    )
    op.create_table(
        "worklist_item",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.Integer(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_worklist_item_series_id_series"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["claimed_by"], ["app_user.id"], name=op.f("fk_worklist_item_claimed_by_app_user"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worklist_item")),
        sa.UniqueConstraint("series_id", name=op.f("uq_worklist_item_series_id")),
    )
    op.create_index("ix_worklist_item_status", "worklist_item", ["status"])


def downgrade() -> None:
    op.drop_index("ix_worklist_item_status", table_name="worklist_item")
    op.drop_table("worklist_item")
    op.drop_table("app_user")
    op.drop_index(op.f("ix_series_score_series_id"), table_name="series_score")
    op.drop_table("series_score")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("route_reason")
        batch.drop_column("route")
        batch.drop_column("state_changed_at")
