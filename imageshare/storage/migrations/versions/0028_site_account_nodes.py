"""A ``site`` account is tied to exactly one connected site (``users.site_node``, the AE
title of its node): site-to-site messages it sends speak for that site only.

Existing data: a site account is linked where its username equals exactly one node's AE title
or display name (case-insensitively) and that node is claimed by no other site account;
anything else stays unlinked, and an unlinked site account is refused site-to-site messages
until an administrator links it (``imageshare user link-site USERNAME AE_TITLE``).

Revision ID: 0028
"""

import sqlalchemy as sa
from alembic import op

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("site_node", sa.String(16), nullable=False,
                                   server_default=""))
    _link_existing(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("site_node")


def _link_existing(conn: sa.Connection) -> None:
    users = sa.table("users", sa.column("pk"), sa.column("username"), sa.column("role"),
                     sa.column("site_node"))
    nodes = sa.table("nodes", sa.column("ae_title"), sa.column("display_name"))
    known = conn.execute(sa.select(nodes.c.ae_title, nodes.c.display_name)).all()
    proposed: dict[int, str] = {}
    for account in conn.execute(sa.select(users.c.pk, users.c.username)
                                .where(users.c.role == "site")).all():
        name = account.username.strip().casefold()
        matches = {n.ae_title for n in known
                   if name and name in (n.ae_title.strip().casefold(),
                                        (n.display_name or "").strip().casefold())}
        if len(matches) == 1:
            proposed[account.pk] = matches.pop()
    for pk, ae_title in proposed.items():
        if list(proposed.values()).count(ae_title) == 1:
            conn.execute(sa.update(users).where(users.c.pk == pk)
                         .values(site_node=ae_title))
