"""Connected sites: what we may do with a node (search, retrieve from, send to) and DICOMweb
credentials.

Revision ID: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("searchable", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("retrieve_from", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("send_to", sa.Boolean, nullable=False,
                                   server_default=sa.true()))
        batch.add_column(sa.Column("dicomweb_auth", sa.String(512), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        for column in ("dicomweb_auth", "send_to", "retrieve_from", "searchable"):
            batch.drop_column(column)
