"""``form_submissions``: forms that create something (share links, teaching cases) handled
once per rendering, so that a double click or a resent form does not create it twice.
Starts empty.

Revision ID: 0034
"""

import sqlalchemy as sa
from alembic import op

revision = "0034"
down_revision = "0033"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "form_submissions",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("form_key", sa.String(64), nullable=False),
        sa.Column("result", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_form_submissions"),
        sa.UniqueConstraint("actor", "kind", "form_key",
                            name="uq_form_submissions_actor_kind_form_key"),
    )
    op.create_index("ix_form_submissions_created_at", "form_submissions", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_form_submissions_created_at", "form_submissions")
    op.drop_table("form_submissions")
