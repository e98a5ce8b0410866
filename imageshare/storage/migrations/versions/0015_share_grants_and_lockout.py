"""Trust: item-level share grants with rights (comment flag, opened by the recipient), share
invitations, per-share annotation authors, token origin, per-address sign-in lockout.

Revision ID: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("shares") as batch:
        batch.add_column(sa.Column("allow_comment", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("opened_at", TS, nullable=True))
    with op.batch_alter_table("api_tokens") as batch:
        # Tokens made before this revision are treated as made in the web app: an
        # administrator without a second factor must enrol before they work again.
        batch.add_column(sa.Column("origin", sa.String(8), nullable=False,
                                   server_default="web"))
    with op.batch_alter_table("annotations") as batch:
        batch.add_column(sa.Column("author_label", sa.String(128), nullable=False,
                                   server_default=""))
    op.execute("UPDATE annotations SET author_label = author")
    with op.batch_alter_table("account_invites") as batch:
        batch.add_column(sa.Column("share_pk", sa.Integer, nullable=True))
        batch.create_foreign_key("fk_account_invites_share_pk_shares", "shares",
                                 ["share_pk"], ["pk"], ondelete="CASCADE")
    op.create_table(
        "login_failures",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("user_pk", sa.Integer, nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("locked_until", TS, nullable=True),
        sa.Column("last_failure_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_login_failures"),
        sa.ForeignKeyConstraint(["user_pk"], ["users.pk"], ondelete="CASCADE",
                                name="fk_login_failures_user_pk_users"),
        sa.UniqueConstraint("user_pk", "source", name="uq_login_failures_user_pk_source"),
    )


def downgrade() -> None:
    op.drop_table("login_failures")
    with op.batch_alter_table("account_invites") as batch:
        batch.drop_constraint("fk_account_invites_share_pk_shares", type_="foreignkey")
        batch.drop_column("share_pk")
    with op.batch_alter_table("annotations") as batch:
        batch.drop_column("author_label")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("origin")
    with op.batch_alter_table("shares") as batch:
        batch.drop_column("opened_at")
        batch.drop_column("allow_comment")
