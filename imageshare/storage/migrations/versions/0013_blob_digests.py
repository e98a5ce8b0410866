"""Each instance's blob digest (SHA-256), recorded at ingest, for scrubbing blobs later.

Instances stored before this revision keep NULL until a scrub records their digest.

Revision ID: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A plain ADD COLUMN (no table copy, also on SQLite): quick on a large archive.
    op.add_column("instances", sa.Column("sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("sha256")
