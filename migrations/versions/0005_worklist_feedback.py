"""Feedback that teaches the gate and worklist depth: contour feedback, worklist assignment, the audit trail.

Revision ID: 0005_worklist_feedback
Revises: 0004_pipeline
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_worklist_feedback"
down_revision: str | None = "0004_pipeline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("worklist_item") as batch:  # batch: SQLite cannot ALTER in place
        batch.add_column(sa.Column("assigned_to", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key(
            op.f("fk_worklist_item_assigned_to_app_user"), "app_user", ["assigned_to"], ["id"], ondelete="SET NULL"
        )
    op.create_table(
        "contour_feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("series_id", sa.Integer(), nullable=False),
        sa.Column("worklist_item_id", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("note", sa.String(2000), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("verdict IN ('yes', 'no', 'not_applicable')", name=op.f("ck_contour_feedback_verdict")),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_contour_feedback_series_id_series"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["worklist_item_id"],
            ["worklist_item.id"],
            name=op.f("fk_contour_feedback_worklist_item_id_worklist_item"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(["user_id"], ["app_user.id"], name=op.f("fk_contour_feedback_user_id_app_user")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_contour_feedback")),
    )
    op.create_index(op.f("ix_contour_feedback_series_id"), "contour_feedback", ["series_id"])
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("worklist_item_id", sa.Integer(), nullable=True),
        sa.Column("series_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["app_user.id"], name=op.f("fk_audit_event_user_id_app_user"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["worklist_item_id"],
            ["worklist_item.id"],
            name=op.f("fk_audit_event_worklist_item_id_worklist_item"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["series_id"], ["series.id"], name=op.f("fk_audit_event_series_id_series"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    op.create_index("ix_audit_event_created_at", "audit_event", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_audit_event_created_at", table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_index(op.f("ix_contour_feedback_series_id"), table_name="contour_feedback")
    op.drop_table("contour_feedback")
    with op.batch_alter_table("worklist_item") as batch:
        batch.drop_constraint(op.f("fk_worklist_item_assigned_to_app_user"), type_="foreignkey")
        batch.drop_column("assigned_at")
        batch.drop_column("assigned_to")
