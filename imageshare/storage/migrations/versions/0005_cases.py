"""Cases and folders ("my archive").

Revision ID: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "cases",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("title", sa.String(128), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("folder", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_cases"),
        sa.UniqueConstraint("public_id", name="uq_cases_public_id"),
    )
    op.create_index("ix_cases_owner", "cases", ["owner"])
    op.create_table(
        "case_items",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("case_pk", sa.Integer, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("sop_uid", sa.String(64), nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("pk", name="pk_case_items"),
        sa.ForeignKeyConstraint(["case_pk"], ["cases.pk"], ondelete="CASCADE",
                                name="fk_case_items_case_pk_cases"),
        sa.UniqueConstraint("case_pk", "study_uid", "series_uid", "sop_uid",
                            name="uq_case_items_case_pk_study_uid_series_uid_sop_uid"),
    )
    op.create_index("ix_case_items_case_pk", "case_items", ["case_pk"])


def downgrade() -> None:
    op.drop_table("case_items")
    op.drop_table("cases")
