"""``shares.purpose``: what a share is for (care, teaching, research), so that identifiable
teaching and research shares end when the patient withdraws or refuses that consent.

Existing data: the purpose each share was made for is in its ``share.create`` audit event
(``detail.purpose``); shares without one (made before purposes existed) were for care.

Revision ID: 0033
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0033"
down_revision = "0032"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("shares") as batch:
        batch.add_column(sa.Column("purpose", sa.String(16), nullable=False,
                                   server_default="care"))
    conn = op.get_bind()
    events = sa.table("audit_events", sa.column("action", sa.String),
                      sa.column("detail", sa.Text))
    shares = sa.table("shares", sa.column("public_id", sa.String),
                      sa.column("purpose", sa.String))
    rows = conn.execute(sa.select(events.c.detail).where(events.c.action == "share.create"))
    for (detail,) in rows:
        try:
            found = json.loads(detail or "{}")
        except ValueError:
            continue
        if not isinstance(found, dict):
            continue
        purpose, share = found.get("purpose"), found.get("share")
        if purpose in ("teaching", "research") and isinstance(share, str):
            conn.execute(sa.update(shares).where(shares.c.public_id == share)
                         .values(purpose=purpose))


def downgrade() -> None:
    with op.batch_alter_table("shares") as batch:
        batch.drop_column("purpose")
