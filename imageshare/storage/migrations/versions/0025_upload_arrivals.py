"""A DICOM file of an upload is stored for review as soon as it has arrived (before Send):
each received file records the instance it became and how its store ended.

Revision ID: 0025
"""

import sqlalchemy as sa
from alembic import op

revision = "0025"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("upload_files") as batch:
        batch.add_column(sa.Column("sop_uid", sa.String(64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("outcome", sa.String(16), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("upload_files") as batch:
        batch.drop_column("outcome")
        batch.drop_column("sop_uid")
