"""data keys: one wrapped AES key per scope (csx_common.datakeys.data_keys_table)

Branch `kernel_data_keys` (README.md beside it).

Revision ID: a86b7347c5b1
Revises:
Create Date: 2026-12-03 14:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a86b7347c5b1"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("kernel_data_keys",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "data_keys",
        sa.Column("key_id", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=80), nullable=False),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("kek_id", sa.String(length=255), nullable=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("encryptions", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id"),
    )
    op.create_index("ix_data_keys_kek_id", "data_keys", ["kek_id"], unique=False)
    op.create_index("ix_data_keys_scope", "data_keys", ["scope"], unique=False)
    # At most one active key per scope.
    op.create_index(
        "ux_data_keys_active_scope",
        "data_keys",
        ["scope"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )


def downgrade() -> None:
    op.drop_index("ux_data_keys_active_scope", table_name="data_keys")
    op.drop_index("ix_data_keys_scope", table_name="data_keys")
    op.drop_index("ix_data_keys_kek_id", table_name="data_keys")
    op.drop_table("data_keys")
