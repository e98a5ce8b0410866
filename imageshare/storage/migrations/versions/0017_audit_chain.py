"""Tamper evidence: every audit row chained by SHA-256 to the one before it.

Adds the chain columns (sequence number, previous hash, own hash) and the one-row chain head,
then chains the rows already in the trail, oldest first (imageshare/audit/chain.py); and the
cursor of the ATNA sender (imageshare/audit/atna.py), after the rows already there.

Revision ID: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (no table copy, also on SQLite): quick on a long trail.
    op.add_column("audit_events", sa.Column("seq", sa.BigInteger, nullable=True))
    op.add_column("audit_events", sa.Column("prev_hash", sa.String(64), nullable=True))
    op.add_column("audit_events", sa.Column("row_hash", sa.String(64), nullable=True))
    op.create_index("ix_audit_events_seq", "audit_events", ["seq"], unique=True)
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "atna_cursor",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("sent_seq", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    )
    from imageshare.audit.chain import chain_existing

    chained = chain_existing(op.get_bind())
    # Rows from before ATNA existed are not sent to the audit repository; every later one is.
    op.get_bind().execute(sa.text(
        "INSERT INTO atna_cursor (id, sent_seq, owner) VALUES (1, :seq, '')"), {"seq": chained})


def downgrade() -> None:
    op.drop_table("atna_cursor")
    op.drop_table("audit_chain_head")
    op.drop_index("ix_audit_events_seq", "audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("row_hash")
        batch.drop_column("prev_hash")
        batch.drop_column("seq")
