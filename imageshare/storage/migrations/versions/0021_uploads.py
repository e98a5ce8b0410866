"""Uploads by invitation: invitations (and staff import batches), their browser sessions,
received files (tus), what each became, and patient accounts bound to their record.

Revision ID: 0021
"""

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0023"  # was "0018"; re-chained after main brought 0023 (one head)
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def _invitation_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["invitation_pk"], ["upload_invitations.pk"],
                                   name=f"fk_{table}_invitation_pk_upload_invitations",
                                   ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "upload_invitations",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=True),
        sa.Column("passcode_hash", sa.String(256), nullable=False, server_default=""),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("email", sa.String(254), nullable=False, server_default=""),
        sa.Column("patient_name", sa.String(324), nullable=False),
        sa.Column("birth_date", sa.String(8), nullable=False, server_default=""),
        sa.Column("nhs_number", sa.String(16), nullable=False, server_default=""),
        sa.Column("hospital_number", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False, server_default=""),
        sa.Column("reference", sa.String(256), nullable=False, server_default=""),
        sa.Column("expected_modality", sa.String(16), nullable=False, server_default=""),
        sa.Column("expected_body_part", sa.String(64), nullable=False, server_default=""),
        sa.Column("max_bytes", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False, server_default=""),
        sa.Column("failed_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("opened_at", TS, nullable=True),
        sa.Column("submitted_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_upload_invitations"),
        sa.UniqueConstraint("public_id", name="uq_upload_invitations_public_id"),
        sa.UniqueConstraint("token_hash", name="uq_upload_invitations_token_hash"),
    )
    op.create_table(
        "upload_sessions",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("invitation_pk", sa.Integer, nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=False),
        sa.Column("csrf_token", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_upload_sessions"),
        _invitation_fk("upload_sessions"),
        sa.UniqueConstraint("token_hash", name="uq_upload_sessions_token_hash"),
    )
    op.create_table(
        "upload_files",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("invitation_pk", sa.Integer, nullable=False),
        sa.Column("upload_id", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False, server_default="1"),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("length", sa.BigInteger, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("completed_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_upload_files"),
        _invitation_fk("upload_files"),
        sa.UniqueConstraint("upload_id", name="uq_upload_files_upload_id"),
    )
    op.create_table(
        "upload_results",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("invitation_pk", sa.Integer, nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("label", sa.String(1024), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("identity", sa.String(16), nullable=False, server_default=""),
        sa.Column("study_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("sop_uid", sa.String(64), nullable=False, server_default=""),
        sa.Column("modality", sa.String(16), nullable=False, server_default=""),
        sa.Column("body_part", sa.String(64), nullable=False, server_default=""),
        sa.Column("original_key", sa.String(64), nullable=False, server_default=""),
        sa.Column("original_sha256", sa.String(64), nullable=False, server_default=""),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_upload_results"),
        _invitation_fk("upload_results"),
    )
    op.create_table(
        "patient_accounts",
        sa.Column("pk", sa.Integer, nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("username", sa.String(128), nullable=False, server_default=""),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False, server_default=""),
        sa.Column("invited_by", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_patient_accounts"),
    )
    op.create_index("ix_patient_accounts_username", "patient_accounts", ["username"])


def downgrade() -> None:
    op.drop_index("ix_patient_accounts_username", "patient_accounts")
    for table in ("patient_accounts", "upload_results", "upload_files", "upload_sessions",
                  "upload_invitations"):
        op.drop_table(table)
