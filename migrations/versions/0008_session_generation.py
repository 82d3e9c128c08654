"""Session revocation: `app_user.session_generation`, signed into every worklist session cookie.

Revision ID: 0008_session_generation
Revises: 0007_model_registry
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_session_generation"
down_revision: str | None = "0007_model_registry"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing users start at 0: the cookies they hold now (which carry no generation) stop working,
    # so everyone logs in once after the upgrade.
    with op.batch_alter_table("app_user") as batch:
        batch.add_column(sa.Column("session_generation", sa.Integer(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("app_user") as batch:
        batch.drop_column("session_generation")
