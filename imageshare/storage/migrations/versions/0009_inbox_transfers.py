"""Inbox of studies received from other sites, and outgoing transfers with receipts.

Revision ID: 0009
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("inbox", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
    op.create_table(
        "inbox_items",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("site", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("instances", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_received", TS, nullable=False),
        sa.Column("last_received", TS, nullable=False),
        sa.Column("decided_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("pk", name="pk_inbox_items"),
        sa.UniqueConstraint("study_uid", "site", name="uq_inbox_items_study_uid_site"),
    )
    op.create_table(
        "transfers",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("site", sa.String(16), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("sent", sa.Integer, nullable=False, server_default="0"),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_transfers"),
        sa.UniqueConstraint("public_id", name="uq_transfers_public_id"),
    )


def downgrade() -> None:
    op.drop_table("transfers")
    op.drop_table("inbox_items")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("inbox")
