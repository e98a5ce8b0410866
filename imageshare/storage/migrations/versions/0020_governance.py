"""Governance: retention policy rules, legal holds, two-administrator deletion requests,
consent records, and when an instance's retention period began (an upload's review).

Revision ID: 0020
"""

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0021"  # was "0018"; re-chained after main brought 0023 and 0021 (one head)
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("class_since", TS, nullable=True))
    op.create_table(
        "retention_rules",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(128), nullable=False),
        sa.Column("retention_class", sa.String(32), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_retention_rules"),
        sa.UniqueConstraint("kind", "value", name="uq_retention_rules_kind_value"),
    )
    op.create_table(
        "legal_holds",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("placed_by", sa.String(128), nullable=False),
        sa.Column("placed_at", TS, nullable=False),
        sa.Column("lifted_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("lifted_at", TS, nullable=True),
        sa.Column("lift_reason", sa.Text, nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("pk", name="pk_legal_holds"),
        sa.UniqueConstraint("public_id", name="uq_legal_holds_public_id"),
    )
    op.create_index("ix_legal_holds_patient_id", "legal_holds", ["patient_id"])
    op.create_index("ix_legal_holds_study_uid", "legal_holds", ["study_uid"])
    op.create_table(
        "deletion_requests",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_by", sa.String(128), nullable=False),
        sa.Column("requested_at", TS, nullable=False),
        sa.Column("decided_by", sa.String(128), nullable=False, server_default=""),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("deleted", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("pk", name="pk_deletion_requests"),
        sa.UniqueConstraint("public_id", name="uq_deletion_requests_public_id"),
    )
    op.create_index("ix_deletion_requests_study_uid", "deletion_requests", ["study_uid"])
    op.create_table(
        "consents",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("given_on", sa.String(10), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("recorded_by", sa.String(128), nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_consents"),
    )
    op.create_index("ix_consents_patient_id", "consents", ["patient_id"])


def downgrade() -> None:
    op.drop_index("ix_consents_patient_id", "consents")
    op.drop_table("consents")
    op.drop_index("ix_deletion_requests_study_uid", "deletion_requests")
    op.drop_table("deletion_requests")
    op.drop_index("ix_legal_holds_study_uid", "legal_holds")
    op.drop_index("ix_legal_holds_patient_id", "legal_holds")
    op.drop_table("legal_holds")
    op.drop_table("retention_rules")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("class_since")
