"""DICOM callers that were refused (for administrators to register), and per-instance
delivery records of transfers (a resent push skips what the peer already has).

Revision ID: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "refused_callers",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("service", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(128), nullable=False),
        sa.Column("count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_seen", TS, nullable=False),
        sa.Column("last_seen", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_refused_callers"),
        sa.UniqueConstraint("ae_title", "host", name="uq_refused_callers_ae_title_host"),
    )
    op.create_table(
        "transfer_deliveries",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("transfer_pk", sa.Integer, nullable=False),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("delivered_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_transfer_deliveries"),
        sa.ForeignKeyConstraint(["transfer_pk"], ["transfers.pk"], ondelete="CASCADE",
                                name="fk_transfer_deliveries_transfer_pk_transfers"),
        sa.UniqueConstraint("transfer_pk", "sop_uid",
                            name="uq_transfer_deliveries_transfer_pk_sop_uid"),
    )


def downgrade() -> None:
    op.drop_table("transfer_deliveries")
    op.drop_table("refused_callers")
