"""``blob_tombstones``: the blobs of deleted instances until they are removed from the store,
so that start-up recovery does not index deleted images again after a crash between the
deletion's commit and the removal of its blobs. Starts empty: a blob left by an earlier
deletion is not known as such (its deletion is in the audit trail, outcome ``warning``).

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
        sa.PrimaryKeyConstraint("blob_key", name="pk_blob_tombstones"),
    )


def downgrade() -> None:
    op.drop_table("blob_tombstones")
