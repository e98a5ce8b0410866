"""What a file stored on arrival showed (its study, how its patient compares with the
invitation's, modality, body part), so that Send reports it without reading it again; and
the indexes that keep announcing a file cheap when an upload holds thousands.

Revision ID: 0026
"""

import sqlalchemy as sa
from alembic import op

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None

_COLUMNS = (("study_uid", 64), ("identity", 16), ("modality", 16), ("body_part", 64))
_INDEXES = {
    "ix_upload_files_invitation_pk_path": ["invitation_pk", "path"],
    "ix_upload_files_invitation_pk_status_length_round": [
        "invitation_pk", "status", "length", "round"],
}


def upgrade() -> None:
    with op.batch_alter_table("upload_files") as batch:
        for name, length in _COLUMNS:
            batch.add_column(sa.Column(name, sa.String(length), nullable=False,
                                       server_default=""))
    for name, columns in _INDEXES.items():
        op.create_index(name, "upload_files", columns)


def downgrade() -> None:
    for name in _INDEXES:
        op.drop_index(name, table_name="upload_files")
    with op.batch_alter_table("upload_files") as batch:
        for name, _length in reversed(_COLUMNS):
            batch.drop_column(name)
