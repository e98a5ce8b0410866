"""What a file stored on arrival showed (its study, how its patient compares with the
invitation's, modality, body part), so that Send reports it without reading it again.

Revision ID: 0026
"""

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

_COLUMNS = (("study_uid", 64), ("identity", 16), ("modality", 16), ("body_part", 64))


def upgrade() -> None:
    with op.batch_alter_table("upload_files") as batch:
        for name, length in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=False,
                                       server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("upload_files") as batch:
        for name, _length in reversed(_COLUMNS):
            batch.drop_column(name)
