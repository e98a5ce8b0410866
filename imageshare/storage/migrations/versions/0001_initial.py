"""Initial index: patients, studies, series, instances, users, tokens, nodes, audit.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("name", sa.String(324), nullable=False),
        sa.Column("name_norm", sa.String(324), nullable=False),
        sa.Column("birth_date", sa.String(8), nullable=False),
        sa.Column("sex", sa.String(16), nullable=False),
        sa.Column("attrs", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_patients"),
        sa.UniqueConstraint("patient_id", "issuer", name="uq_patients_patient_id_issuer"),
    )
    op.create_index("ix_patients_name_norm", "patients", ["name_norm"])
    op.create_index("ix_patients_birth_date", "patients", ["birth_date"])

    op.create_table(
        "patient_identifiers",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("patient_pk", sa.Integer, nullable=False),
        sa.Column("value", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_patient_identifiers"),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patients.pk"], ondelete="CASCADE",
            name="fk_patient_identifiers_patient_pk_patients",
        ),
        sa.UniqueConstraint(
            "patient_pk", "value", "issuer", name="uq_patient_identifiers_patient_pk_value_issuer"
        ),
    )
    op.create_index("ix_patient_identifiers_value", "patient_identifiers", ["value"])

    op.create_table(
        "studies",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("patient_pk", sa.Integer, nullable=False),
        sa.Column("study_date", sa.String(8), nullable=False),
        sa.Column("study_time", sa.String(16), nullable=False),
        sa.Column("accession_number", sa.String(16), nullable=False),
        sa.Column("study_id", sa.String(16), nullable=False),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("description_norm", sa.String(64), nullable=False),
        sa.Column("referring_name", sa.String(324), nullable=False),
        sa.Column("referring_norm", sa.String(324), nullable=False),
        sa.Column("modalities", sa.String(128), nullable=False),
        sa.Column("num_series", sa.Integer, nullable=False),
        sa.Column("num_instances", sa.Integer, nullable=False),
        sa.Column("attrs", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_studies"),
        sa.ForeignKeyConstraint(
            ["patient_pk"], ["patients.pk"], name="fk_studies_patient_pk_patients"
        ),
        sa.UniqueConstraint("study_uid", name="uq_studies_study_uid"),
    )
    op.create_index("ix_studies_patient_pk", "studies", ["patient_pk"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_index("ix_studies_updated_at", "studies", ["updated_at"])

    op.create_table(
        "series",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("study_pk", sa.Integer, nullable=False),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("series_number", sa.Integer, nullable=True),
        sa.Column("description", sa.String(64), nullable=False),
        sa.Column("body_part", sa.String(16), nullable=False),
        sa.Column("num_instances", sa.Integer, nullable=False),
        sa.Column("attrs", sa.JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_series"),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.pk"], name="fk_series_study_pk_studies"),
        sa.UniqueConstraint("series_uid", name="uq_series_series_uid"),
    )
    op.create_index("ix_series_study_pk", "series", ["study_pk"])
    op.create_index("ix_series_modality", "series", ["modality"])

    op.create_table(
        "instances",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("sop_uid", sa.String(64), nullable=False),
        sa.Column("series_pk", sa.Integer, nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("instance_number", sa.Integer, nullable=True),
        sa.Column("transfer_syntax", sa.String(64), nullable=False),
        sa.Column("number_of_frames", sa.Integer, nullable=False),
        sa.Column("rows", sa.Integer, nullable=True),
        sa.Column("columns", sa.Integer, nullable=True),
        sa.Column("bits_allocated", sa.Integer, nullable=True),
        sa.Column("blob_key", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("retention_class", sa.String(32), nullable=False),
        sa.Column("received_from", sa.String(128), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_instances"),
        sa.ForeignKeyConstraint(
            ["series_pk"], ["series.pk"], name="fk_instances_series_pk_series"
        ),
        sa.UniqueConstraint("sop_uid", name="uq_instances_sop_uid"),
        sa.UniqueConstraint("blob_key", name="uq_instances_blob_key"),
    )
    op.create_index("ix_instances_series_pk", "instances", ["series_pk"])
    op.create_index("ix_instances_sop_class_uid", "instances", ["sop_class_uid"])

    op.create_table(
        "users",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(128), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("user_pk", sa.Integer, nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_api_tokens"),
        sa.ForeignKeyConstraint(
            ["user_pk"], ["users.pk"], ondelete="CASCADE", name="fk_api_tokens_user_pk_users"
        ),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
    )
    op.create_index("ix_api_tokens_user_pk", "api_tokens", ["user_pk"])

    op.create_table(
        "nodes",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("ae_title", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("dicomweb_url", sa.String(1024), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("may_query", sa.Boolean, nullable=False),
        sa.Column("may_retrieve", sa.Boolean, nullable=False),
        sa.Column("may_store", sa.Boolean, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_nodes"),
        sa.UniqueConstraint("ae_title", name="uq_nodes_ae_title"),
    )

    op.create_table(
        "audit_events",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("actor_kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    op.create_index("ix_audit_events_study_uid", "audit_events", ["study_uid"])


def downgrade() -> None:
    for table in (
        "audit_events", "nodes", "api_tokens", "users", "instances", "series", "studies",
        "patient_identifiers", "patients",
    ):
        op.drop_table(table)
