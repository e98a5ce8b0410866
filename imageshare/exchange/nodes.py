"""Registered remote nodes (DICOM AEs and DICOMweb endpoints), read fresh on every use so
that a node added while the server runs is usable at once."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from imageshare.access.policy import DICOM_QUERY, DICOM_RETRIEVE, DICOM_STORE, INBOX
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import SYSTEM, Actor
from imageshare.domain.errors import ImageShareError, NotFound, UnknownNode
from imageshare.storage.index.schema import nodes, refused_callers, users
from imageshare.storage.secret_box import SecretBox

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# Cloud metadata services outside the link-local range (AWS over IPv6, Alibaba Cloud).
_METADATA = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200"))


def forbidden_address(address: str) -> str:
    """Why no site may be reached at the IP ``address`` ("" when one may): a link-local
    address (where cloud metadata services answer, 169.254.169.254 among them), another known
    metadata address, an unspecified (0.0.0.0, which reaches this machine) or multicast one.
    Loopback and private addresses are allowed: hospitals' networks use them."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "is not at an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _METADATA:
        return "is at a cloud metadata address"
    if ip.is_link_local:
        return "is at a link-local address (where cloud metadata services answer)"
    if ip.is_unspecified or ip.is_multicast:
        return "is at an address no site has (unspecified or multicast)"
    return ""


def check_dicomweb_url(url: str) -> None:
    """Refuse (:class:`ImageShareError`, saying why) a DICOMweb address that is not an
    absolute http(s) URL with a host, that carries credentials (they would be shown and
    logged with the address: they go in the site's credentials), or whose host is an IP
    address no site may have (:func:`forbidden_address`). Empty is allowed (no DICOMweb)."""
    if not url:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ImageShareError("the DICOMweb address is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or any(
            ord(char) < 33 or ord(char) == 127 for char in url):
        raise ImageShareError("a DICOMweb address is an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ImageShareError("a DICOMweb address carries no user or password: give them as "
                              "the site's DICOMweb credentials")
    try:
        ipaddress.ip_address(parts.hostname.split("%", 1)[0])
    except ValueError:
        return  # a host name: checked each time a connection is opened
    why = forbidden_address(parts.hostname)
    if why:
        raise ImageShareError(f"the DICOMweb address {why}: no site is reached there")


def check_dicom_host(host: str) -> None:
    """Refuse (:class:`ImageShareError`, saying why) a DICOM host that is an IP address no
    site may have (:func:`forbidden_address`: a metadata service, link-local, unspecified,
    multicast) or that holds characters no host name has."""
    if any(ord(char) < 33 or ord(char) == 127 or char in "/\\@" for char in host):
        raise ImageShareError("a node's host is a host name or an IP address")
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return  # a host name
    why = forbidden_address(host.strip("[]"))
    if why:
        raise ImageShareError(f"the node's host {why}: no DICOM node is reached there")


def certificate_fingerprint(value: str) -> str:
    """A node's pinned certificate as stored: the SHA-256 fingerprint (64 hex digits, with or
    without colons or spaces, as ``openssl x509 -fingerprint -sha256`` prints it) in lowercase,
    or "" for none; ImageShareError for anything else."""
    digits = "".join(value.split()).replace(":", "").lower()
    if digits.startswith("sha256fingerprint="):
        digits = digits.removeprefix("sha256fingerprint=")
    if not digits:
        return ""
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ImageShareError("a certificate fingerprint is the SHA-256 of the certificate: "
                              "64 hexadecimal digits (openssl x509 -noout -fingerprint "
                              "-sha256 -in node.crt)")
    return digits


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
    # The certificate this node presents over DICOM TLS (SHA-256 of its DER form, lowercase
    # hex): another certificate of the same authority calling as this AE title is refused.
    tls_certificate: str = ""

    def credentials(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        """What to present to this site over HTTP: headers (a bearer token) and HTTP Basic
        credentials (user, password), from ``dicomweb_auth``."""
        if self.dicomweb_auth.lower().startswith("bearer "):
            return {"Authorization": self.dicomweb_auth}, None
        if ":" in self.dicomweb_auth:
            user, _, password = self.dicomweb_auth.partition(":")
            return {}, (user, password)
        return {}, None

    @property
    def shown_url(self) -> str:
        """The DICOMweb address as people may see it: without a user or password that an
        older version let into it (they are credentials)."""
        parts = urlsplit(self.dicomweb_url)
        if "@" not in parts.netloc:
            return self.dicomweb_url
        return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()

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
    """Adds, lists and finds nodes in the index database; every change is audited (when built
    with an audit trail: the composition root always does)."""

    def __init__(self, engine: Engine, secrets_box: SecretBox,
                 audit: AuditTrail | None = None) -> None:
        self._engine = engine
        self._box = secrets_box
        self._audit = audit

    def _audited(self, conn: Connection, actor: Actor, action: str,
                 detail: dict[str, object]) -> None:
        if self._audit is not None:
            self._audit.record(AuditEvent(actor=actor, action=action, outcome="success",
                                          detail=detail), conn)

    def add(self, node: Node, replace: bool = False, actor: Actor = SYSTEM,
            origin: str = "") -> None:
        """Register ``node`` (``actor``'s ``node.add``, audited in the same transaction;
        ``origin`` says where it came from); with ``replace`` an existing AE title is
        updated."""
        ae = node.ae_title.strip()
        if not _AE.match(ae) or not ae:
            raise ImageShareError("an AE title has 1 to 16 printable characters, no backslash")
        if not node.host or not 0 < node.port < 65536:
            raise ImageShareError("a node needs a host and a port between 1 and 65535")
        check_dicomweb_url(node.dicomweb_url)
        check_dicom_host(node.host)
        pinned = certificate_fingerprint(node.tls_certificate)
        if pinned and not node.tls:
            raise ImageShareError("a certificate is pinned for a node reached over DICOM TLS "
                                  "only: register it with TLS")
        values = {
            "ae_title": ae, "host": node.host, "port": node.port,
            "dicomweb_url": node.dicomweb_url, "display_name": node.display_name or ae,
            "may_query": node.may_query, "may_retrieve": node.may_retrieve,
            "may_store": node.may_store, "searchable": node.searchable,
            "retrieve_from": node.retrieve_from, "send_to": node.send_to,
            "dicomweb_auth": self._box.seal(node.dicomweb_auth), "inbox": node.inbox,
            "tls": node.tls, "tls_certificate": pinned,
        }
        with self._engine.begin() as conn:
            exists = conn.execute(select(nodes.c.pk).where(nodes.c.ae_title == ae)).scalar()
            if exists is not None and not replace:
                raise ImageShareError(f"node {ae} is registered already (use --replace)")
            other = conn.execute(select(users.c.username).where(
                users.c.role == "site", func.upper(users.c.username) == ae.upper(),
                users.c.site_node != "", func.upper(users.c.site_node) != ae.upper())).scalar()
            if other is not None:  # what each sender stores waits in the inbox under its name
                raise ImageShareError(
                    f"the site account {other!r}, linked to another site, is spelled like "
                    f"{ae}: the two senders' arrivals would mix; register the node under "
                    "another AE title or rename the account")
            if exists is not None:
                conn.execute(update(nodes).where(nodes.c.pk == exists).values(**values))
            else:
                conn.execute(insert(nodes).values(created_at=datetime.now(UTC), **values))
            detail: dict[str, object] = {"ae_title": ae, "host": node.host, "port": node.port}
            if origin:
                detail["from"] = origin
            self._audited(conn, actor, "node.add", detail)

    def remove(self, ae_title: str, actor: Actor = SYSTEM) -> None:
        """Forget a node (``actor``'s ``node.remove``, audited)."""
        with self._engine.begin() as conn:
            if not conn.execute(delete(nodes).where(nodes.c.ae_title == ae_title)).rowcount:
                raise UnknownNode(f"no node {ae_title}")
            # Its site accounts are unlinked: a node registered later under this AE title
            # (another endpoint, perhaps another hospital) is not spoken for by them unless
            # someone links them again.
            unlinked = conn.execute(select(users.c.username).where(
                users.c.role == "site", func.upper(users.c.site_node) == ae_title.upper())
            ).scalars().all()
            if unlinked:
                conn.execute(update(users).where(users.c.username.in_(unlinked))
                             .values(site_node=""))
            detail: dict[str, object] = {"ae_title": ae_title}
            if unlinked:
                detail["unlinked_site_accounts"] = sorted(unlinked)
            self._audited(conn, actor, "node.remove", detail)

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

    def _node(self, row: Row[Any]) -> Node:
        m = row._mapping
        return Node(
            ae_title=m["ae_title"], host=m["host"], port=m["port"],
            dicomweb_url=m["dicomweb_url"], display_name=m["display_name"],
            may_query=m["may_query"], may_retrieve=m["may_retrieve"],
            may_store=m["may_store"], searchable=m["searchable"],
            retrieve_from=m["retrieve_from"], send_to=m["send_to"],
            dicomweb_auth=self._box.open(m["dicomweb_auth"]), inbox=m["inbox"],
            tls=bool(m["tls"]), tls_certificate=m["tls_certificate"] or "",
        )


@dataclass(frozen=True)
class RefusedCaller:
    """A calling AE title and host the DICOM listener refused, with how often and why."""

    ae_title: str
    host: str
    service: str
    reason: str
    count: int
    first_seen: datetime
    last_seen: datetime
    registered_host: str = ""

    @property
    def registered(self) -> bool:
        """The AE title is registered (at another host, or without the refused service)."""
        return bool(self.registered_host)


class RefusedCallers:
    """DICOM callers that were refused: each refusal is audited and counted per AE title and
    host, so that an administrator can see who tries to connect and register one in one step.
    The most recent :attr:`KEEP` are listed (every refusal stays in the audit trail)."""

    KEEP = 1000

    def __init__(self, engine: Engine, nodes: NodeRegistry, audit: AuditTrail) -> None:
        self._engine = engine
        self._nodes = nodes
        self._audit = audit

    def record(self, actor: Actor, host: str, action: str, service: str, reason: str) -> None:
        """Audit one refused request of ``actor`` (a node) from ``host`` and count it."""
        now = datetime.now(UTC)
        ae, host = actor.name[:16], host[:255]
        match = (refused_callers.c.ae_title == ae) & (refused_callers.c.host == host)
        values = {"service": service[:16], "reason": reason[:128], "last_seen": now}
        with self._engine.begin() as conn:
            counted = conn.execute(update(refused_callers).where(match).values(
                count=refused_callers.c.count + 1, **values)).rowcount
            if not counted:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(refused_callers).values(
                            ae_title=ae, host=host, count=1, first_seen=now, **values))
                    # Bounded: a scan with made-up AE titles cannot grow the list for ever.
                    keep = select(refused_callers.c.pk).order_by(
                        refused_callers.c.last_seen.desc()).limit(self.KEEP)
                    conn.execute(delete(refused_callers).where(
                        refused_callers.c.pk.not_in(keep)))
                except IntegrityError:  # another process counted the first one meanwhile
                    conn.execute(update(refused_callers).where(match).values(
                        count=refused_callers.c.count + 1, **values))
            self._audit.record(AuditEvent(
                actor=actor, action=action, outcome="refused",
                detail={"service": service, "reason": reason, "calling_ae": ae, "host": host}),
                conn)

    def all(self, limit: int = 500) -> list[RefusedCaller]:
        """Refused callers, the most recent first."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(refused_callers).order_by(
                refused_callers.c.last_seen.desc()).limit(limit)).mappings().all()
        known = {n.ae_title: n.host for n in self._nodes.all()}
        return [RefusedCaller(
            ae_title=r["ae_title"], host=r["host"], service=r["service"], reason=r["reason"],
            count=r["count"], first_seen=r["first_seen"], last_seen=r["last_seen"],
            registered_host=known.get(r["ae_title"], "")) for r in rows]

    def register(self, ae_title: str, host: str, actor: Actor, port: int = 104,
                 may_query: bool = False) -> Node:
        """Register a refused caller as a node at the host it called from, allowed to store
        (and, with ``may_query``, to query and retrieve); audited. An AE title registered
        already is not changed here (a call from another host may be an impersonation)."""
        with self._engine.connect() as conn:
            seen = conn.execute(select(refused_callers.c.pk).where(
                refused_callers.c.ae_title == ae_title, refused_callers.c.host == host)).first()
        if seen is None:
            raise NotFound("no refused caller with this AE title and host")
        existing = self._nodes.find(ae_title)
        if existing is not None:
            raise ImageShareError(
                f"{ae_title} is registered already (at {existing.host}); a call from another "
                "host may be an impersonation: change the node itself if it really moved")
        node = Node(ae_title=ae_title, host=host, port=port, may_query=may_query,
                    may_retrieve=may_query, may_store=True, searchable=False,
                    retrieve_from=False, send_to=False)
        self._nodes.add(node, actor=actor, origin="refused callers")  # audited there
        with self._engine.begin() as conn:
            conn.execute(delete(refused_callers).where(refused_callers.c.ae_title == ae_title,
                                                       refused_callers.c.host == host))
        return node
