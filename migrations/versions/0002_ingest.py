"""DICOM ingest: duplicate and queue bookkeeping on series, geometry findings, quarantined instances.

Revision ID: 0002_ingest
Revises: 0001_initial
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_ingest"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        # server defaults fill the rows that exist already
        batch.add_column(sa.Column("num_duplicates", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("queue_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("geometry_findings", sa.JSON(), nullable=True))
        # the assembler looks up series by state every second
        batch.create_index("ix_series_state", ["state"])
    op.create_table(
        "quarantined_instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("relative_path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_quarantined_instance_series_id_series"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quarantined_instance")),
    )
    op.create_index(op.f("ix_quarantined_instance_series_id"), "quarantined_instance", ["series_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_quarantined_instance_series_id"), table_name="quarantined_instance")
    op.drop_table("quarantined_instance")
    with op.batch_alter_table("series") as batch:
        batch.drop_index("ix_series_state")
        batch.drop_column("geometry_findings")
        batch.drop_column("queue_attempts")
        batch.drop_column("queued_at")
        batch.drop_column("num_duplicates")
