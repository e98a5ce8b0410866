"""Secrets at rest and DICOM TLS: room for encrypted TOTP secrets and site credentials (they
are encrypted on start, with a key kept outside the database), and whether a node is reached
over DICOM TLS.

Revision ID: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.alter_column("totp_secret", type_=sa.String(512), existing_nullable=True)
    with op.batch_alter_table("nodes") as batch:
        batch.alter_column("dicomweb_auth", type_=sa.String(2048), existing_nullable=False,
                           existing_server_default="")
        batch.add_column(sa.Column("tls", sa.Boolean, nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("tls")
        batch.alter_column("dicomweb_auth", type_=sa.String(512), existing_nullable=False)
    with op.batch_alter_table("users") as batch:
        batch.alter_column("totp_secret", type_=sa.String(64), existing_nullable=True)
