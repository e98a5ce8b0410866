"""Patient accounts are bound to their record through the one-time account invitation they
were made with, never by e-mail address: ``account_invites.accepted_by`` (the account made
with the invitation) and ``patient_accounts.invite_pk`` (the invitation sent for the record).

Existing data: a record already bound to an account (``patient_accounts.username``) keeps
its account, unless the invitation sent for it is found to have made another account (then
the binding came from an address typed by the account that took it, and is undone). For
the others, the invitation sent with each record is found (the patient
invitation to the same address from the same member of staff made just before the record,
as ``PatientAccounts.invite`` made them), and a used invitation records the account made
with it when exactly one patient account was created in the minute after it was used and no
other used invitation claims that account. Anything ambiguous stays unbound (the patient is
invited again); the e-mail address an account holds now is never consulted.

Revision ID: 0027
"""

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None

_FK = "fk_patient_accounts_invite_pk_account_invites"
_INDEX = "ix_patient_accounts_invite_pk"
_MADE_WITHIN = timedelta(seconds=60)
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("account_invites") as batch:
        batch.add_column(sa.Column("accepted_by", sa.String(128), nullable=False,
                                   server_default=""))
    with op.batch_alter_table("patient_accounts") as batch:
        batch.add_column(sa.Column("invite_pk", sa.Integer, nullable=True))
        batch.create_foreign_key(_FK, "account_invites", ["invite_pk"], ["pk"],
                                 ondelete="SET NULL")
    op.create_index(_INDEX, "patient_accounts", ["invite_pk"])
    _link_existing(op.get_bind())


def downgrade() -> None:
    op.drop_index(_INDEX, table_name="patient_accounts")
    with op.batch_alter_table("patient_accounts") as batch:
        batch.drop_constraint(_FK, type_="foreignkey")
        batch.drop_column("invite_pk")
    with op.batch_alter_table("account_invites") as batch:
        batch.drop_column("accepted_by")


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _link_existing(conn: sa.Connection) -> None:
    invites = sa.table("account_invites", sa.column("pk"), sa.column("email"),
                       sa.column("role"), sa.column("invited_by"), sa.column("created_at", _TS),
                       sa.column("used_at", _TS), sa.column("accepted_by"))
    records = sa.table("patient_accounts", sa.column("pk"), sa.column("email"),
                       sa.column("invited_by"), sa.column("created_at", _TS),
                       sa.column("invite_pk"), sa.column("username"))
    users = sa.table("users", sa.column("username"), sa.column("role"),
                     sa.column("created_at", _TS))
    sent = conn.execute(sa.select(invites.c.pk, invites.c.email, invites.c.invited_by,
                                  invites.c.created_at, invites.c.used_at)
                        .where(invites.c.role == "patient").order_by(invites.c.pk)).all()
    # Each record with the invitation sent for it (the latest not yet paired before it).
    paired: set[int] = set()
    for record in conn.execute(sa.select(records.c.pk, records.c.email, records.c.invited_by,
                                         records.c.created_at).order_by(records.c.pk)).all():
        candidates = [i for i in sent if i.pk not in paired and i.email == record.email
                      and i.invited_by == record.invited_by
                      and _utc(i.created_at) <= _utc(record.created_at)]
        if candidates:
            chosen = max(candidates, key=lambda i: (_utc(i.created_at), i.pk))
            paired.add(chosen.pk)
            conn.execute(sa.update(records).where(records.c.pk == record.pk)
                         .values(invite_pk=chosen.pk))
    # Each used invitation with the one patient account made just after it was used.
    made = conn.execute(sa.select(users.c.username, users.c.created_at)
                        .where(users.c.role == "patient")).all()
    claims: dict[int, str] = {}
    for invite in sent:
        if invite.pk not in paired or invite.used_at is None:
            continue
        used = _utc(invite.used_at)
        accounts = [u.username for u in made
                    if used <= _utc(u.created_at) <= used + _MADE_WITHIN]
        if len(accounts) == 1:
            claims[invite.pk] = accounts[0]
    accepted = {pk: username for pk, username in claims.items()
                if list(claims.values()).count(username) == 1}
    for pk, username in accepted.items():
        conn.execute(sa.update(invites).where(invites.c.pk == pk)
                     .values(accepted_by=username))
    # A record bound to another account than the one its invitation made was bound by the
    # old rule (an address an account could type for itself): it is unbound, so that
    # nobody keeps a record they took that way (the patient is invited again).
    for bound in conn.execute(sa.select(records.c.pk, records.c.username, records.c.invite_pk)
                              .where(records.c.username != "",
                                     records.c.invite_pk.is_not(None))).all():
        made_it = accepted.get(bound.invite_pk)
        if made_it is not None and made_it != bound.username:
            conn.execute(sa.update(records).where(records.c.pk == bound.pk)
                         .values(username=""))
