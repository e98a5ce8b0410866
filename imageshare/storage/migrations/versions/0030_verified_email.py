"""An account's e-mail address counts for what is addressed to it (shares sent to that
address, listed under "Shared with me") only once confirmed: ``users.email_verified_at``, and
``email_confirmations``, the one-time links (hashes only) mailed to an address an account sets
for itself. Addresses set by an administrator or bound by an accepted invitation count as
confirmed when they are set.

Existing data: an address is trusted (confirmed at the time of the upgrade) unless the audit
trail shows that the account itself set it, since that is the one way an address could be
typed without anyone checking it. For each account with an address, the newest successful
``user.email`` event about it decides: made by the account itself (actor ``user:<name>``, the
account page; also an administrator changing their own address on the users page), the
address stays unconfirmed, unless it is the address of the invitation the account was made
with; made by an administrator, or no such event (the address was given when the account was
made: ``imageshare user add --email``, the users page, an invitation), it is trusted. Self-set
addresses have been audited since they could first be set, so none is trusted by mistake; an
account whose address stays unconfirmed sees a button under "Shared with me" that mails it a
link. Downgrading drops the links and the confirmation times (the old rules trust every
address).

Revision ID: 0030
"""

import json
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("email_verified_at", _TS, nullable=True))
    op.create_table(
        "email_confirmations",
        sa.Column("pk", sa.Integer, primary_key=True),
        sa.Column("user_pk", sa.Integer, nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("used_at", _TS, nullable=True),
        sa.Column("voided_at", _TS, nullable=True),
        sa.PrimaryKeyConstraint("pk", name="pk_email_confirmations"),
        sa.ForeignKeyConstraint(["user_pk"], ["users.pk"], ondelete="CASCADE",
                                name="fk_email_confirmations_user_pk_users"),
        sa.UniqueConstraint("token_hash", name="uq_email_confirmations_token_hash"),
    )
    op.create_index("ix_email_confirmations_user_pk", "email_confirmations", ["user_pk"])
    _trust_existing(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_email_confirmations_user_pk", table_name="email_confirmations")
    op.drop_table("email_confirmations")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("email_verified_at")


def _trust_existing(conn: sa.Connection) -> None:
    users = sa.table("users", sa.column("pk"), sa.column("username"), sa.column("email"),
                     sa.column("email_verified_at", _TS))
    events = sa.table("audit_events", sa.column("pk"), sa.column("actor"),
                      sa.column("action"), sa.column("outcome"), sa.column("detail"))
    invites = sa.table("account_invites", sa.column("email"), sa.column("accepted_by"))
    # The newest successful change of each account's address, and who made it.
    set_by: dict[str, str] = {}
    for actor, detail in conn.execute(
            sa.select(events.c.actor, events.c.detail)
            .where(events.c.action == "user.email", events.c.outcome == "success")
            .order_by(events.c.pk)).all():
        try:
            username = json.loads(detail or "{}").get("user")
        except (ValueError, AttributeError):
            continue
        if isinstance(username, str):
            set_by[username] = actor
    invited = {(row.accepted_by, row.email.strip().lower()) for row in conn.execute(
        sa.select(invites.c.accepted_by, invites.c.email)
        .where(invites.c.accepted_by != "")).all()}
    now = datetime.now(UTC)
    for account in conn.execute(sa.select(users.c.pk, users.c.username, users.c.email)
                                .where(users.c.email != "")).all():
        # (the trail keeps an actor's first 128 characters)
        self_set = set_by.get(account.username) == f"user:{account.username}"[:128]
        if self_set and (account.username, account.email.strip().lower()) not in invited:
            continue
        conn.execute(sa.update(users).where(users.c.pk == account.pk)
                     .values(email_verified_at=now))
