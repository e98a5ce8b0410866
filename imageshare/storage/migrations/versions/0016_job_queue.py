"""Scale-out: the durable job queue, the sign-in throttle per address and cache generations
shared by every instance.

Revision ID: 0016
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "background_jobs",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("description", sa.String(256), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("sealed_params", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("run_after", TS, nullable=False),
        sa.Column("done", sa.Integer, nullable=False),
        sa.Column("total", sa.Integer, nullable=False),
        sa.Column("summary", sa.String(512), nullable=False),
        sa.Column("error", sa.String(512), nullable=False),
        sa.Column("result", sa.String(64), nullable=True),
        sa.Column("started_by", sa.String(128), nullable=False),
        sa.Column("notify", sa.Boolean, nullable=False),
        sa.Column("dedupe_key", sa.String(128), nullable=True),
        sa.Column("lease_owner", sa.String(96), nullable=True),
        sa.Column("lease_expires", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_background_jobs"),
        sa.UniqueConstraint("public_id", name="uq_background_jobs_public_id"),
        sa.UniqueConstraint("dedupe_key", name="uq_background_jobs_dedupe_key"),
    )
    op.create_index("ix_background_jobs_state_run_after", "background_jobs",
                    ["state", "run_after"])
    op.create_table(
        "sign_in_failures",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("failed_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_sign_in_failures"),
    )
    op.create_index("ix_sign_in_failures_source_failed_at", "sign_in_failures",
                    ["source", "failed_at"])
    op.create_table(
        "cache_generations",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_cache_generations"),
    )


def downgrade() -> None:
    op.drop_table("cache_generations")
    op.drop_index("ix_sign_in_failures_source_failed_at", "sign_in_failures")
    op.drop_table("sign_in_failures")
    op.drop_index("ix_background_jobs_state_run_after", "background_jobs")
    op.drop_table("background_jobs")
