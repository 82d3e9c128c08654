"""Export to the PACS: one row per object to deliver, one row per C-STORE attempt (the receipt).

Revision ID: 0003_export
Revises: 0002_ingest
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_export"
down_revision: str | None = "0002_ingest"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "export",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=True),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        # a SEG outlives the received series it was made from: its receipt stays
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_export_series_id_series"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export")),
        # one row per object: the SEG's deterministic UID makes a second export of it find this one
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_export_sop_instance_uid")),
    )
    op.create_index(op.f("ix_export_series_id"), "export", ["series_id"])
    # `exports list --state` and the search for due exports filter by state
    op.create_index("ix_export_state", "export", ["state"])
    op.create_table(
        "export_attempt",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("export_id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["export_id"], ["export.id"], name=op.f("fk_export_attempt_export_id_export"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_export_attempt")),
    )
    op.create_index(op.f("ix_export_attempt_export_id"), "export_attempt", ["export_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_export_attempt_export_id"), table_name="export_attempt")
    op.drop_table("export_attempt")
    op.drop_index("ix_export_state", table_name="export")
    op.drop_index(op.f("ix_export_series_id"), table_name="export")
    op.drop_table("export")
