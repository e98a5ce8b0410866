"""What was asked of other sites about a patient, and when.

Revision ID: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "site_checks",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("patient_key", sa.String(128), nullable=False),
        sa.Column("site", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(256), nullable=False),
        sa.Column("found", sa.Integer, nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_site_checks"),
        sa.UniqueConstraint("patient_key", "site", name="uq_site_checks_patient_key_site"),
    )


def downgrade() -> None:
    op.drop_table("site_checks")
