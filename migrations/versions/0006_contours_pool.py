"""Returned contours and the training pool: `contour_object` and `pool_entry`.

Revision ID: 0006_contours_pool
Revises: 0005_worklist_feedback
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_contours_pool"
down_revision: str | None = "0005_worklist_feedback"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "contour_object",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("referenced_series_instance_uid", sa.String(64), nullable=True),
        sa.Column("frame_of_reference_uid", sa.String(64), nullable=True),
        sa.Column("matched_series_id", sa.Integer(), nullable=True),
        sa.Column("structure_name", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_contour_object_series_id_series"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["instance_id"], ["instance.id"], name=op.f("fk_contour_object_instance_id_instance"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["matched_series_id"],
            ["series.id"],
            name=op.f("fk_contour_object_matched_series_id_series"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contour_object")),
        sa.UniqueConstraint("instance_id", name=op.f("uq_contour_object_instance_id")),
    )
    op.create_index(op.f("ix_contour_object_series_id"), "contour_object", ["series_id"])
    op.create_index(op.f("ix_contour_object_matched_series_id"), "contour_object", ["matched_series_id"])
    op.create_index("ix_contour_object_status", "contour_object", ["status"])
    op.create_table(
        "pool_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("contour_id", sa.Integer(), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("contour_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("structure_name", sa.Text(), nullable=False),
        sa.Column("mask_path", sa.Text(), nullable=False),
        sa.Column("mask_sha256", sa.String(64), nullable=False),
        sa.Column("num_slices", sa.Integer(), nullable=False),
        sa.Column("liver_voxels", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("contoured_by", sa.Integer(), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_pool_entry_series_id_series"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["contour_id"],
            ["contour_object.id"],
            name=op.f("fk_pool_entry_contour_id_contour_object"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["contoured_by"], ["app_user.id"], name=op.f("fk_pool_entry_contoured_by_app_user"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pool_entry")),
        sa.UniqueConstraint("contour_id", name=op.f("uq_pool_entry_contour_id")),
    )
    op.create_index(op.f("ix_pool_entry_series_id"), "pool_entry", ["series_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_pool_entry_series_id"), table_name="pool_entry")
    op.drop_table("pool_entry")
    op.drop_index("ix_contour_object_status", table_name="contour_object")
    op.drop_index(op.f("ix_contour_object_matched_series_id"), table_name="contour_object")
    op.drop_index(op.f("ix_contour_object_series_id"), table_name="contour_object")
    op.drop_table("contour_object")
