"""Exchange as the receiving hospital lives it: what travels with a pushed study (sender,
priority, note, contact, the transfer it belongs to) kept on the inbox item with the state of
the receipt sent back; the receipt on the sender's transfer; the other site's id of a request
for prior imaging, with who answered it; the studies each site last answered with (for the
live status per site); where each temporary copy came from and until when it is kept.

Revision ID: 0019
"""

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0022"  # the last of the migrations made beside it (0023, 0021, 0020, 0022)
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _text(name: str, length: int | None = None) -> sa.Column:
    kind = sa.String(length) if length else sa.Text
    return sa.Column(name, kind, nullable=False, server_default="")


def upgrade() -> None:
    with op.batch_alter_table("inbox_items") as batch:
        batch.add_column(_text("origin", 16))
        batch.add_column(_text("sender_name", 128))
        batch.add_column(sa.Column("priority", sa.String(16), nullable=False,
                                   server_default="routine"))
        batch.add_column(_text("message"))
        batch.add_column(_text("contact", 256))
        batch.add_column(_text("transfer_id", 32))
        batch.add_column(_text("request_id", 32))
        batch.add_column(sa.Column("announced_at", TS, nullable=True))
        batch.add_column(_text("receipt_state", 16))
        batch.add_column(_text("receipt_detail", 512))
    with op.batch_alter_table("transfers") as batch:
        batch.add_column(_text("contact", 256))
        batch.add_column(_text("request_id", 32))
        batch.add_column(_text("announced", 16))
        batch.add_column(_text("receipt_outcome", 16))
        batch.add_column(_text("receipt_by", 128))
        batch.add_column(sa.Column("receipt_at", TS, nullable=True))
        batch.add_column(_text("receipt_note"))
    with op.batch_alter_table("site_checks") as batch:
        batch.add_column(sa.Column("studies", sa.Text, nullable=False, server_default="[]"))
    op.create_table(
        "retrieved_copies",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("site", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False, server_default=""),
        sa.Column("retrieved_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("retrieved_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("pk", name="pk_retrieved_copies"),
        sa.UniqueConstraint("study_uid", name="uq_retrieved_copies_study_uid"),
    )
    with op.batch_alter_table("imaging_requests") as batch:
        batch.add_column(_text("remote_id", 32))
        batch.add_column(_text("answered_by", 128))
        batch.add_column(sa.Column("answered_at", TS, nullable=True))


def downgrade() -> None:
    op.drop_table("retrieved_copies")
    with op.batch_alter_table("site_checks") as batch:
        batch.drop_column("studies")
    with op.batch_alter_table("imaging_requests") as batch:
        for name in ("answered_at", "answered_by", "remote_id"):
            batch.drop_column(name)
    with op.batch_alter_table("transfers") as batch:
        for name in ("receipt_note", "receipt_at", "receipt_by", "receipt_outcome",
                     "announced", "request_id", "contact"):
            batch.drop_column(name)
    with op.batch_alter_table("inbox_items") as batch:
        for name in ("receipt_detail", "receipt_state", "announced_at", "request_id",
                     "transfer_id", "contact", "message", "priority", "sender_name",
                     "origin"):
            batch.drop_column(name)
