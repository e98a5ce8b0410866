"""Teaching files and accreditation review: teaching-case fields (history, findings, diagnosis,
differential, keywords, modality, body part, difficulty, collection) and non-DICOM case
attachments; a share's description, the sender's interpretation and the mentor's sign-off;
feedback per clip.

Revision ID: 0022
"""

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0020"  # was "0018"; re-chained after main brought 0023, 0021 and 0020 (one head)
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
CASE_TEXTS = ("history", "findings", "diagnosis", "differential", "keywords")


def upgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False,
                                   server_default="case"))
        for name in CASE_TEXTS:
            batch.add_column(sa.Column(name, sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("modality", sa.String(16), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("body_part", sa.String(64), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("difficulty", sa.String(16), nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("collection", sa.String(128), nullable=False,
                                   server_default=""))
    op.create_table(
        "case_attachments",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("case_pk", sa.Integer, nullable=False),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("title", sa.String(128), nullable=False),
        sa.Column("media_type", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("blob_key", sa.String(256), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_case_attachments"),
        sa.ForeignKeyConstraint(["case_pk"], ["cases.pk"], ondelete="CASCADE",
                                name="fk_case_attachments_case_pk_cases"),
        sa.UniqueConstraint("public_id", name="uq_case_attachments_public_id"),
    )
    op.create_index("ix_case_attachments_case_pk", "case_attachments", ["case_pk"])
    with op.batch_alter_table("shares") as batch:
        batch.add_column(sa.Column("description", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("interpretation", sa.Text, nullable=False,
                                   server_default=""))
        batch.add_column(sa.Column("signed_off_at", TS, nullable=True))
        batch.add_column(sa.Column("sign_off_note", sa.Text, nullable=False,
                                   server_default=""))
    with op.batch_alter_table("share_feedback") as batch:
        batch.add_column(sa.Column("public_sop_uid", sa.String(64), nullable=False,
                                   server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("share_feedback") as batch:
        batch.drop_column("public_sop_uid")
    with op.batch_alter_table("shares") as batch:
        for name in ("sign_off_note", "signed_off_at", "interpretation", "description"):
            batch.drop_column(name)
    op.drop_index("ix_case_attachments_case_pk", "case_attachments")
    op.drop_table("case_attachments")
    with op.batch_alter_table("cases") as batch:
        for name in ("collection", "difficulty", "body_part", "modality", *CASE_TEXTS, "kind"):
            batch.drop_column(name)
