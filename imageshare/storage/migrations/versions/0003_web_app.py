"""Web app: two-factor sign-in, session stages, study comments, patient detail history.

Revision ID: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("totp_secret", sa.String(64), nullable=True))
        batch.add_column(sa.Column("totp_enabled", sa.Boolean, nullable=False,
                                   server_default=sa.false()))
        batch.add_column(sa.Column("totp_last_step", sa.BigInteger, nullable=True))
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("stage", sa.String(16), nullable=False,
                                   server_default="full"))
    op.create_table(
        "study_comments",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("author_kind", sa.String(16), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_study_comments"),
    )
    op.create_index("ix_study_comments_study_uid", "study_comments", ["study_uid"])
    op.create_table(
        "patient_changes",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("change_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("attribute", sa.String(64), nullable=False),
        sa.Column("old_value", sa.String(324), nullable=False),
        sa.Column("new_value", sa.String(324), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_patient_changes"),
    )
    op.create_index("ix_patient_changes_study_uid", "patient_changes", ["study_uid"])
    op.create_index("ix_patient_changes_change_id", "patient_changes", ["change_id"])


def downgrade() -> None:
    op.drop_table("patient_changes")
    op.drop_table("study_comments")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("stage")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("totp_last_step")
        batch.drop_column("totp_enabled")
        batch.drop_column("totp_secret")
