"""Which upload made an instance is looked up by the instance's SOP Instance UID: a file an
upload found stored already (made by another upload, waiting for that one's review) is not
its to accept or reject.

Revision ID: 0031
"""

from alembic import op

revision = "0031"
down_revision = "0030"
branch_labels = None
depends_on = None

_INDEXES = {"ix_upload_files_sop_uid": "upload_files",
            "ix_upload_results_sop_uid": "upload_results"}


def upgrade() -> None:
    for name, table in _INDEXES.items():
        op.create_index(name, table, ["sop_uid"])


def downgrade() -> None:
    for name, table in _INDEXES.items():
        op.drop_index(name, table_name=table)
