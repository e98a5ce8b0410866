"""Patient-name prefix searches use the index on PostgreSQL: the name index is rebuilt with
the ``varchar_pattern_ops`` operator class (a plain btree serves LIKE only under the C
collation). Nothing changes on SQLite.

Revision ID: 0023
"""

from alembic import op

revision = "0023"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_patients_name_norm", table_name="patients")
    op.create_index("ix_patients_name_norm", "patients", ["name_norm"],
                    postgresql_ops={"name_norm": "varchar_pattern_ops"})


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index("ix_patients_name_norm", table_name="patients")
    op.create_index("ix_patients_name_norm", "patients", ["name_norm"])
