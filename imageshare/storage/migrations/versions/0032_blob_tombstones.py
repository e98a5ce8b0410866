"""``blob_tombstones``: the blobs the index let go of (deleted instances, the old content of
corrected or replaced ones) until they are removed from the store, so that start-up recovery
does not index deleted images again (or put old content back) after a crash between the
commit and the removal; ``kept`` marks the old content of a study under a legal hold, kept as
evidence until no hold covers ``study_uid``. Starts empty: a blob left by an earlier deletion
is not known as such (its deletion is in the audit trail, outcome ``warning``).

Revision ID: 0032
"""

import sqlalchemy as sa
from alembic import op

revision = "0032"
down_revision = "0031"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_tombstones",
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("kept", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.PrimaryKeyConstraint("blob_key", name="pk_blob_tombstones"),
    )
    op.create_index("ix_blob_tombstones_study_uid", "blob_tombstones", ["study_uid"])


def downgrade() -> None:
    op.drop_table("blob_tombstones")
