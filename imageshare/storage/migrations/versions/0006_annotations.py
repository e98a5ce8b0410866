"""Annotations (arrows, length measurements) drawn in the viewer.

Revision ID: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("frame", sa.Integer, nullable=False),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("marks", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_annotations"),
        sa.UniqueConstraint("sop_uid", "frame", "author",
                            name="uq_annotations_sop_uid_frame_author"),
    )
    op.create_index("ix_annotations_study_uid", "annotations", ["study_uid"])


def downgrade() -> None:
    op.drop_table("annotations")
