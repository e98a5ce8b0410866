"""``nodes.tls_certificate``: the SHA-256 fingerprint of the certificate a node must present
over DICOM TLS (empty: any certificate the trusted authorities signed). Existing nodes start
unpinned.

Revision ID: 0035
"""

import sqlalchemy as sa
from alembic import op

revision = "0035"
down_revision = "0034"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("tls_certificate", sa.String(64), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("tls_certificate")
