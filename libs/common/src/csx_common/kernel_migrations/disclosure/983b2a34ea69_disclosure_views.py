"""disclosure views: consent, sharing decisions and break-glass grants as referrals announced them
(csx_safeguarding.disclosure.disclosure_tables)

Branch `kernel_disclosure` (README.md beside it).

Revision ID: 983b2a34ea69
Revises:
Create Date: 2026-12-03 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "983b2a34ea69"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("kernel_disclosure",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consent_view",
        sa.Column("child_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("agencies", sa.JSON(), nullable=False),
        sa.Column("data_classes", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("child_id"),
    )
    op.create_table(
        "sharing_view",
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("child_id", sa.String(length=36), nullable=False),
        sa.Column("share", sa.Boolean(), nullable=False),
        sa.Column("lawful_basis", sa.Integer(), nullable=False),
        sa.Column("approver", sa.String(length=64), nullable=False),
        sa.Column("agencies", sa.JSON(), nullable=False),
        sa.Column("data_classes", sa.JSON(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("decision_id"),
    )
    op.create_index("ix_sharing_view_child_id", "sharing_view", ["child_id"], unique=False)
    op.create_table(
        "break_glass_view",
        sa.Column("grant_id", sa.String(length=36), nullable=False),
        sa.Column("child_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("grant_id"),
    )
    op.create_index("ix_break_glass_view_user_child", "break_glass_view", ["user_id", "child_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_break_glass_view_user_child", table_name="break_glass_view")
    op.drop_table("break_glass_view")
    op.drop_index("ix_sharing_view_child_id", table_name="sharing_view")
    op.drop_table("sharing_view")
    op.drop_table("consent_view")
