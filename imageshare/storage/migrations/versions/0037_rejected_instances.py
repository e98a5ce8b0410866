"""``rejected_instances``: the SOP Instance UIDs an approved study deletion took away, refused
when they are sent again (IHE IOCM). Deletions made before this revision are not listed.

Revision ID: 0037
"""

import sqlalchemy as sa
from alembic import op

revision = "0037"
down_revision = "0036"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rejected_instances",
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("request", sa.String(32), nullable=False, server_default=""),
        sa.Column("rejected_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sop_uid", name="pk_rejected_instances"),
    )
    op.create_index("ix_rejected_instances_study_uid", "rejected_instances", ["study_uid"])


def downgrade() -> None:
    op.drop_index("ix_rejected_instances_study_uid", table_name="rejected_instances")
    op.drop_table("rejected_instances")
