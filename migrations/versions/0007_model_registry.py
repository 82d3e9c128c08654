"""The model registry: `model_version` (every segmenter, detector and gate version) and `model_event`.

Revision ID: 0007_model_registry
Revises: 0006_contours_pool
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_model_registry"
down_revision: str | None = "0006_contours_pool"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("training_data", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_by", sa.String(64), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("promoted_by", sa.String(64), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replaced_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("kind IN ('segmenter', 'detector', 'gate')", name=op.f("ck_model_version_kind")),
        sa.CheckConstraint("status IN ('candidate', 'active', 'retired')", name=op.f("ck_model_version_status")),
        sa.ForeignKeyConstraint(
            ["replaced_id"],
            ["model_version.id"],
            name=op.f("fk_model_version_replaced_id_model_version"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_version")),
        sa.UniqueConstraint("kind", "version", name=op.f("uq_model_version_kind_version")),
    )
    op.create_index(
        "uq_model_version_active_kind",
        "model_version",
        ["kind"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "model_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
            name=op.f("fk_model_event_model_version_id_model_version"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_event")),
    )
    op.create_index(op.f("ix_model_event_model_version_id"), "model_event", ["model_version_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_model_event_model_version_id"), table_name="model_event")
    op.drop_table("model_event")
    op.drop_index("uq_model_version_active_kind", table_name="model_version")
    op.drop_table("model_version")
