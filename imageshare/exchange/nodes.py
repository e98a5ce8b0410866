"""Registered remote nodes (DICOM AEs and DICOMweb endpoints), read fresh on every use so
that a node added while the server runs is usable at once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select, update

from imageshare.access.policy import DICOM_QUERY, DICOM_RETRIEVE, DICOM_STORE, INBOX
from imageshare.domain.errors import ImageShareError, UnknownNode
from imageshare.storage.index.schema import nodes
from imageshare.storage.secret_box import SecretBox

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


@dataclass(frozen=True)
class Node:
    """A remote site's DICOM AE (and optional DICOMweb URL) with what it may do here."""

    ae_title: str
    host: str
    port: int
    dicomweb_url: str = ""
    display_name: str = ""
    may_query: bool = True
    may_retrieve: bool = True
    may_store: bool = True
    searchable: bool = True
    retrieve_from: bool = True
    send_to: bool = True
    dicomweb_auth: str = ""
    inbox: bool = False
    tls: bool = False

    @property
    def label(self) -> str:
        """How people name the site."""
        return self.display_name or self.ae_title

    @property
    def grants(self) -> frozenset[str]:
        """The DICOM actions this node may ask of us."""
        granted = set()
        if self.may_query:
            granted.add(DICOM_QUERY)
        if self.may_retrieve:
            granted.add(DICOM_RETRIEVE)
        if self.may_store:
            granted.add(DICOM_STORE)
        if self.inbox:
            granted.add(INBOX)
        return frozenset(granted)


class NodeRegistry:
    """Adds, lists and finds nodes in the index database."""

    def __init__(self, engine: Engine, secrets_box: SecretBox) -> None:
        self._engine = engine
        self._box = secrets_box

    def add(self, node: Node, replace: bool = False) -> None:
        """Register ``node``; with ``replace`` an existing AE title is updated."""
        ae = node.ae_title.strip()
        if not _AE.match(ae) or not ae:
            raise ImageShareError("an AE title has 1 to 16 printable characters, no backslash")
        if not node.host or not 0 < node.port < 65536:
            raise ImageShareError("a node needs a host and a port between 1 and 65535")
        values = {
            "ae_title": ae, "host": node.host, "port": node.port,
            "dicomweb_url": node.dicomweb_url, "display_name": node.display_name or ae,
            "may_query": node.may_query, "may_retrieve": node.may_retrieve,
            "may_store": node.may_store, "searchable": node.searchable,
            "retrieve_from": node.retrieve_from, "send_to": node.send_to,
            "dicomweb_auth": self._box.seal(node.dicomweb_auth), "inbox": node.inbox,
            "tls": node.tls,
        }
        with self._engine.begin() as conn:
            exists = conn.execute(select(nodes.c.pk).where(nodes.c.ae_title == ae)).scalar()
            if exists is not None and not replace:
                raise ImageShareError(f"node {ae} is registered already (use --replace)")
            if exists is not None:
                conn.execute(update(nodes).where(nodes.c.pk == exists).values(**values))
            else:
                conn.execute(insert(nodes).values(created_at=datetime.now(UTC), **values))

    def remove(self, ae_title: str) -> None:
        """Forget a node."""
        with self._engine.begin() as conn:
            if not conn.execute(delete(nodes).where(nodes.c.ae_title == ae_title)).rowcount:
                raise UnknownNode(f"no node {ae_title}")

    def find(self, ae_title: str) -> Node | None:
        """The node with this AE title, or None."""
        with self._engine.connect() as conn:
            row = conn.execute(select(nodes).where(nodes.c.ae_title == ae_title.strip())).first()
        return self._node(row) if row else None

    def get(self, ae_title: str) -> Node:
        """The node with this AE title; raises UnknownNode."""
        node = self.find(ae_title)
        if node is None:
            raise UnknownNode(f"no node {ae_title} is registered")
        return node

    def all(self) -> list[Node]:
        """Every registered node."""
        with self._engine.connect() as conn:
            return [self._node(r)
                    for r in conn.execute(select(nodes).order_by(nodes.c.ae_title))]

    def seal_stored_credentials(self) -> int:
        """Encrypt site credentials still stored in plaintext (written by an older version);
        returns how many were sealed."""
        sealed = 0
        with self._engine.begin() as conn:
            for pk, auth in conn.execute(select(nodes.c.pk, nodes.c.dicomweb_auth)).all():
                if auth and not SecretBox.is_sealed(auth):
                    conn.execute(update(nodes).where(nodes.c.pk == pk)
                                 .values(dicomweb_auth=self._box.seal(auth)))
                    sealed += 1
        return sealed

    def _node(self, row: object) -> Node:
        m = row._mapping  # type: ignore[attr-defined]
        return Node(
            ae_title=m["ae_title"], host=m["host"], port=m["port"],
            dicomweb_url=m["dicomweb_url"], display_name=m["display_name"],
            may_query=m["may_query"], may_retrieve=m["may_retrieve"],
            may_store=m["may_store"], searchable=m["searchable"],
            retrieve_from=m["retrieve_from"], send_to=m["send_to"],
            dicomweb_auth=self._box.open(m["dicomweb_auth"]), inbox=m["inbox"],
            tls=bool(m["tls"]),
        )
