"""``deletion_requests.patient_issuer``: the Issuer of Patient ID of the study's patient when the
deletion was asked for, so that what is done after the study is gone (allowing its images
again) still names the patient with the issuer of the ID. Requests made before this revision
have none ("").

Revision ID: 0038
"""

import sqlalchemy as sa
from alembic import op

revision = "0038"
down_revision = "0037"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch:
        batch.add_column(sa.Column("patient_issuer", sa.String(64), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("deletion_requests") as batch:
        batch.drop_column("patient_issuer")
