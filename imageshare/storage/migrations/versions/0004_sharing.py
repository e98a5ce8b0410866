"""Sharing: links with passcodes, their items and sessions, comments, feedback, notifications.

Revision ID: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "shares",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("title", sa.String(128), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("recipient_email", sa.String(254), nullable=False),
        sa.Column("recipient_user", sa.String(128), nullable=False),
        sa.Column("passcode_hash", sa.String(256), nullable=False),
        sa.Column("allow_download", sa.Boolean, nullable=False),
        sa.Column("deidentified", sa.Boolean, nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("reviewed_at", TS, nullable=True),
        sa.Column("expiry_notified", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("pk", name="pk_shares"),
        sa.UniqueConstraint("public_id", name="uq_shares_public_id"),
        sa.UniqueConstraint("token_hash", name="uq_shares_token_hash"),
    )
    op.create_index("ix_shares_owner", "shares", ["owner"])
    op.create_table(
        "share_items",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("share_pk", sa.Integer, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("public_study_uid", sa.String(64), nullable=False),
        sa.Column("public_series_uid", sa.String(64), nullable=False),
        sa.Column("public_sop_uid", sa.String(64), nullable=False),
        sa.Column("held_back", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("pk", name="pk_share_items"),
        sa.ForeignKeyConstraint(["share_pk"], ["shares.pk"], ondelete="CASCADE",
                                name="fk_share_items_share_pk_shares"),
        sa.UniqueConstraint("share_pk", "public_sop_uid",
                            name="uq_share_items_share_pk_public_sop_uid"),
    )
    op.create_index("ix_share_items_share_pk", "share_items", ["share_pk"])
    op.create_table(
        "share_sessions",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("share_pk", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_share_sessions"),
        sa.ForeignKeyConstraint(["share_pk"], ["shares.pk"], ondelete="CASCADE",
                                name="fk_share_sessions_share_pk_shares"),
        sa.UniqueConstraint("token_hash", name="uq_share_sessions_token_hash"),
    )
    op.create_table(
        "share_comments",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("share_pk", sa.Integer, nullable=False),
        sa.Column("public_sop_uid", sa.String(64), nullable=False),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_share_comments"),
        sa.ForeignKeyConstraint(["share_pk"], ["shares.pk"], ondelete="CASCADE",
                                name="fk_share_comments_share_pk_shares"),
    )
    op.create_index("ix_share_comments_share_pk", "share_comments", ["share_pk"])
    op.create_table(
        "share_feedback",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("share_pk", sa.Integer, nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("view_obtained", sa.String(16), nullable=False),
        sa.Column("image_quality", sa.Integer, nullable=False),
        sa.Column("findings", sa.Text, nullable=False),
        sa.Column("agreement", sa.String(16), nullable=False),
        sa.Column("comments", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_share_feedback"),
        sa.ForeignKeyConstraint(["share_pk"], ["shares.pk"], ondelete="CASCADE",
                                name="fk_share_feedback_share_pk_shares"),
    )
    op.create_index("ix_share_feedback_share_pk", "share_feedback", ["share_pk"])
    op.create_table(
        "notifications",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("text", sa.String(512), nullable=False),
        sa.Column("link", sa.String(512), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("read_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_notifications"),
    )
    op.create_index("ix_notifications_username", "notifications", ["username"])
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email", sa.String(254), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("email")
    for table in ("notifications", "share_feedback", "share_comments", "share_sessions",
                  "share_items", "shares"):
        op.drop_table(table)
