"""EHR launch (IHE IID): registered EHR systems with their sealed shared secrets, and the
nonces of signed launch URLs already used.

Revision ID: 0018
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "ehr_systems",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("secret", sa.String(512), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_ehr_systems"),
        sa.UniqueConstraint("name", name="uq_ehr_systems_name"),
    )
    op.create_table(
        "launch_nonces",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("ehr", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_launch_nonces"),
        sa.UniqueConstraint("ehr", "nonce", name="uq_launch_nonces_ehr_nonce"),
    )
    op.create_index("ix_launch_nonces_expires_at", "launch_nonces", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_launch_nonces_expires_at", "launch_nonces")
    op.drop_table("launch_nonces")
    op.drop_table("ehr_systems")
