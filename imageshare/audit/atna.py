"""ATNA: every audit event also sent to an audit repository as a DICOM PS3.15 A.5 message.

Each row of the audit trail becomes a DICOM audit message (XML per the DICOM Audit Message
Schema, PS3.15 A.5.1, with the codes of :mod:`imageshare.audit.events`), wrapped in an RFC 5424
syslog message (facility authpriv, severity notice, MSGID ``IHE+RFC-3881``) and sent over TLS
with RFC 5425 octet-counting framing to the configured repository (``atna_host``/``atna_port``,
its authority in ``atna_ca_file``, our client certificate in ``atna_client_certificate``).

The audit table itself is the buffer on disk: the sender follows the chain's sequence numbers
(which commit in order) and keeps how far it got in the ``atna_cursor`` row, so events written
while the repository is down are sent, in order, when it is back, and the request that
recorded an event never waits for the network. One process sends at a time (a lease in the
cursor row), also with several instances on one database.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from xml.sax.saxutils import quoteattr

from sqlalchemy import Engine, String, or_, type_coerce, update
from sqlalchemy import select as sql_select

from imageshare.audit.chain import _at_text
from imageshare.audit.events import (
    APPLICATION_ACTIVITY,
    BEGIN_TRANSFERRING,
    CATALOGUE,
    EXPORT,
    IMPORT,
    INSTANCES_TRANSFERRED,
    PARTICIPANT_OBJECTS,
    QUERY,
    Code,
    EventType,
)
from imageshare.audit.trail import PATIENT_ISSUER
from imageshare.storage.index.schema import atna_cursor, audit_events

log = logging.getLogger("imageshare.atna")

CURSOR_ROW = 1
PRIORITY = 10 * 8 + 5  # facility 10 (security/authorization), severity 5 (notice)
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
OUTCOMES = {"success": "0", "warning": "4", "refused": "4", "failure": "8"}
SOURCE_ROLE = Code("110153", "DCM", "Source Role ID")
DESTINATION_ROLE = Code("110152", "DCM", "Destination Role ID")
DESTINATION_MEDIA = Code("110154", "DCM", "Destination Media")
SOURCE_MEDIA = Code("110155", "DCM", "Source Media")
# CID 405 Media Type: a download, an upload and a backup folder are all reached by a URI.
MEDIA_URI = Code("110037", "DCM", "URI")
# Network transfers: the requestor and ImageShare are the two ends (Source / Destination Role
# ID). Export and Import (A.5.3.5, A.5.3.6) are media: ImageShare is the exporting process
# (Source) or the importing one (Destination), and the media is an active participant of its
# own (Destination Media / Source Media, with its MediaIdentifier).
_TRANSFERS = {BEGIN_TRANSFERRING.code, INSTANCES_TRANSFERRED.code}
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
AUDIT_TRAIL_URI = "urn:imageshare:audit-trail"
# ImageShare's own action (``study.view`` ...) as a further EventTypeCode, in a private coding
# scheme (PS3.16 8.2: designators of private schemes begin with "99").
ACTION_SCHEME = "99IMAGESHARE"
# RFC 5425 4.3.1 / RFC 5424 6.1: a receiver need keep no more than 8192 octets of a message
# (rsyslog's default, for one), and cuts the rest: an XML document cut short is lost. Values
# that can be long (reasons, queries, names from the outside) are shortened to stay below.
MAX_MESSAGE = 8192
MAX_XML = MAX_MESSAGE - 512  # room for the syslog header
MAX_ID = 256
MAX_TEXT = 512
MAX_QUERY = 2048
# What XML 1.0 cannot carry (section 2.2 Char): C0 controls other than tab, newline and
# carriage return, lone surrogates (json.loads gives them back), U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class AtnaConfig:
    """Where audit messages go and how ImageShare names itself in them."""

    host: str
    port: int
    ca_file: str = ""
    client_certificate: str = ""
    client_private_key: str = ""
    audit_source_id: str = "IMAGESHARE"
    enterprise_site_id: str = ""
    ae_title: str = "IMAGESHARE"


def _xml_chars(value: object, limit: int) -> str:
    """``value`` as text XML 1.0 can carry: at most ``limit`` characters, each character it
    cannot carry replaced by U+FFFD (so that a reader sees something was there)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return _NOT_XML.sub("\ufffd", text)


def _attr(value: object, limit: int = MAX_ID) -> str:
    """An attribute value, quoted and escaped (also tab, newline, carriage return)."""
    return quoteattr(_xml_chars(value, limit))


def _coded(tag: str, code: Code) -> str:
    return (f"<{tag} csd-code={_attr(code.code)} codeSystemName={_attr(code.system)} "
            f"originalText={_attr(code.meaning)}/>")


def _network_point(source: str) -> str:
    """NetworkAccessPointID and its type code attributes for an actor's source."""
    host = source.rsplit("@", 1)[-1].strip()
    if not host or host in ("cli", "local", "tests", "internal"):
        return ""
    try:
        ipaddress.ip_address(host)
        kind = "2"
    except ValueError:
        kind = "1"
    return f" NetworkAccessPointID={_attr(host)} NetworkAccessPointTypeCode=\"{kind}\""


# An issuer that is an ISO OID (Universal Entity ID of type ISO), not a local namespace.
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# HL7 v2 escapes of the delimiters a CX value uses (v2.5 2.7.1), the escape character first.
_HL7_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"),
                ("~", "\\R\\"))


def _hl7(text: str) -> str:
    """``text`` with the HL7 v2 delimiters escaped (a value cannot end a component early)."""
    for plain, escaped in _HL7_ESCAPES:
        text = text.replace(plain, escaped)
    return text


def patient_cx(patient_id: str, issuer: str) -> str:
    """The patient ID as IHE ITI ATNA writes it (HL7 v2 CX, PS3.15 A.5.3 "Patient"): the ID
    with its assigning authority, ``ID^^^&OID&ISO`` for an issuer that is an OID and
    ``ID^^^NAMESPACE`` for a local one (a patient ID is unique only with its issuer); the ID
    alone when it has none."""
    if not issuer:
        return _hl7(patient_id)
    if _OID.fullmatch(issuer):
        return f"{_hl7(patient_id)}^^^&{issuer}&ISO"
    return f"{_hl7(patient_id)}^^^{_hl7(issuer)}"


def _object_id(kind: str, row: dict[str, Any], detail: dict[str, Any]) -> str:
    if kind == "patient":
        patient_id = row.get("patient_id") or ""
        issuer = detail.get(PATIENT_ISSUER)
        return patient_cx(patient_id, issuer if isinstance(issuer, str) else "") \
            if patient_id else ""
    if kind == "study":
        return row.get("study_uid") or ""
    if kind == "audit-log":
        return AUDIT_TRAIL_URI
    if kind == "query":
        return STUDY_ROOT_FIND
    keys = {"user": ("username", "user"), "node": ("ae_title", "calling_ae", "site", "origin"),
            "share": ("share",), "job": ("job", "snapshot"), "case": ("case",),
            "request": ("request",), "token": ("token", "name")}[kind]
    for key in keys:
        if detail.get(key) not in (None, ""):
            return str(detail[key])
    return ""


def _participant_object(kind: str, row: dict[str, Any], detail: dict[str, Any]) -> str:
    object_id = _object_id(kind, row, detail)
    if not object_id:
        return ""
    p = PARTICIPANT_OBJECTS[kind]
    parts = [f"<ParticipantObjectIdentification ParticipantObjectID={_attr(object_id)} "
             f"ParticipantObjectTypeCode=\"{p.type_code}\" "
             f"ParticipantObjectTypeCodeRole=\"{p.role}\">",
             _coded("ParticipantObjectIDTypeCode", p.id_type)]
    if kind == "query":
        query = _query_bytes(detail)
        parts.append(f"<ParticipantObjectQuery>{base64.b64encode(query).decode()}"
                     "</ParticipantObjectQuery>")
        parts.append("<ParticipantObjectDetail type=\"QueryEncoding\" "
                     f"value=\"{base64.b64encode(b'UTF-8').decode()}\"/>")
    else:
        parts.append(f"<ParticipantObjectName>{_text(object_id)}</ParticipantObjectName>")
    issuer = detail.get(PATIENT_ISSUER)
    if kind == "patient" and isinstance(issuer, str) and issuer:
        # The issuer also on its own (DICOM's Issuer of Patient ID, (0010,0021)).
        value = base64.b64encode(issuer.encode("utf-8")).decode()
        parts.append(f"<ParticipantObjectDetail type=\"IssuerOfPatientID\" value=\"{value}\"/>")
    if kind == "study" and row.get("instance_count"):
        parts.append("<ParticipantObjectDescription><SOPClass NumberOfInstances="
                     f"\"{int(row['instance_count'])}\"/></ParticipantObjectDescription>")
    parts.append("</ParticipantObjectIdentification>")
    return "".join(parts)


def _query_bytes(detail: dict[str, Any]) -> bytes:
    """The query (the event's detail) as UTF-8 JSON of at most ``MAX_QUERY`` bytes: long values
    are shortened (the JSON stays whole), surrogates are written as JSON escapes."""
    query = json.dumps(detail, sort_keys=True, default=str).encode()
    if len(query) <= MAX_QUERY:
        return query
    short = {str(k)[:64]: (v if isinstance(v, bool | int | float) or v is None
                           else _xml_chars(v, 128)) for k, v in list(detail.items())[:32]}
    query = json.dumps(short, sort_keys=True, default=str).encode()
    return query if len(query) <= MAX_QUERY else b'{"truncated":true}'


def _text(value: object, limit: int = MAX_TEXT) -> str:
    """Element content: characters XML 1.0 cannot carry replaced, the rest escaped."""
    return (_xml_chars(value, limit).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;"))


def _media_id(action: str, detail: dict[str, Any], export: bool) -> str:
    """What names the media of an export (where it went) or an import (where it came from)."""
    for key in (("destination", "format", "share", "job") if export
                else ("source", "upload", "site", "origin", "job")):
        if detail.get(key) not in (None, ""):
            return f"{action}:{key}:{detail[key]}"
    return action or "media"


def _event(action: str) -> EventType:
    """The catalogue's entry for ``action``; an action this version does not catalogue (a row
    written by another version) is sent as an application activity naming it, never refused:
    one row the sender cannot write would hold back every row after it."""
    known = CATALOGUE.get(action)
    if known is not None:
        return known
    return EventType(action, "", APPLICATION_ACTIVITY, "E", ("patient", "study"))


def audit_message(row: dict[str, Any], config: AtnaConfig) -> bytes:
    """The DICOM PS3.15 A.5 audit message (XML, UTF-8) for one audit trail row, at most
    ``MAX_MESSAGE`` octets with its syslog header: should the detail make it longer, the
    message carries a note pointing at the row of the audit trail instead."""
    xml = _audit_message(row, config)
    if len(xml) <= MAX_XML:
        return xml
    note: dict[str, Any] = {"reason": f"the detail is in the audit trail, seq={row.get('seq')} "
                                      "(too long for a syslog message)"}
    try:  # the patient stays named whole: its ID with its issuer
        issuer = json.loads(row.get("detail") or "{}").get(PATIENT_ISSUER)
    except (ValueError, TypeError, AttributeError):
        issuer = None
    if isinstance(issuer, str) and issuer:
        note[PATIENT_ISSUER] = issuer[:64]
    return _audit_message({**row, "actor": str(row.get("actor") or "-")[:64],
                           "detail": json.dumps(note)}, config)


def _audit_message(row: dict[str, Any], config: AtnaConfig) -> bytes:
    action = str(row.get("action") or "")
    event = _event(action)
    try:
        detail = json.loads(row.get("detail") or "{}")
    except (ValueError, TypeError):
        detail = {}
    detail = detail if isinstance(detail, dict) else {}
    parts = [
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><AuditMessage>",
        f"<EventIdentification EventActionCode=\"{event.action_code}\" "
        f"EventDateTime=\"{_at_text(row['at'])}\" "
        f"EventOutcomeIndicator=\"{OUTCOMES.get(row['outcome'], '4')}\">",
        _coded("EventID", event.event_id),
    ]
    if event.event_type is not None:
        parts.append(_coded("EventTypeCode", event.event_type))
    if action:
        parts.append(_coded("EventTypeCode", Code(action, ACTION_SCHEME, action)))
    reason = detail.get("reason") or detail.get("error")
    if reason and row["outcome"] != "success":
        parts.append(f"<EventOutcomeDescription>{_text(str(reason))}</EventOutcomeDescription>")
    parts.append("</EventIdentification>")
    transfer = event.event_id.code in _TRANSFERS
    we_send = event.action_code != "C"  # a read sends from us; a create received at us
    requestor_role = own_role = other = ""
    if transfer:
        other_role = _coded("RoleIDCode", DESTINATION_ROLE if we_send else SOURCE_ROLE)
        own_role = _coded("RoleIDCode", SOURCE_ROLE if we_send else DESTINATION_ROLE)
        other_end = _object_id("node", row, detail) if "node" in event.objects else ""
        if other_end and row.get("actor_kind") != "node":
            # A member of staff pushed to a site (A.5.3.2/A.5.3.3): the site is the other
            # end of the transfer, an active participant of its own; the requestor received
            # or sent nothing and takes no role.
            other = (f"<ActiveParticipant UserID={_attr(other_end)} "
                     f"UserIsRequestor=\"false\">{other_role}</ActiveParticipant>")
        elif detail.get("destination") and detail["destination"] != row["actor"]:
            # A C-MOVE to a third AE (A.5.3.3): that AE receives; the requestor only asked.
            other = (f"<ActiveParticipant UserID={_attr(detail['destination'])} "
                     f"UserIsRequestor=\"false\">{other_role}</ActiveParticipant>")
        else:
            requestor_role = other_role
    elif event.event_id.code == QUERY.code:
        # PS3.15 A.5.3.12: the process issuing the query (Source Role ID) and the one that
        # answers it (Destination Role ID, ImageShare) each carry their RoleIDCode.
        requestor_role = _coded("RoleIDCode", SOURCE_ROLE)
        own_role = _coded("RoleIDCode", DESTINATION_ROLE)
    elif event.event_id.code in (EXPORT.code, IMPORT.code):
        export = event.event_id.code == EXPORT.code
        own_role = _coded("RoleIDCode", SOURCE_ROLE if export else DESTINATION_ROLE)
        other = (f"<ActiveParticipant UserID={_attr(_media_id(action, detail, export))} "
                 "UserIsRequestor=\"false\">"
                 + _coded("RoleIDCode", DESTINATION_MEDIA if export else SOURCE_MEDIA)
                 + "<MediaIdentifier>" + _coded("MediaType", MEDIA_URI)
                 + "</MediaIdentifier></ActiveParticipant>")
    # The person behind a process-like actor (an identifiable share link is used by the one
    # account it is bound to): named as the requestor's UserName.
    person = (f" UserName={_attr(detail['user'])}"
              if str(row.get("actor") or "").startswith("share:")
              and isinstance(detail.get("user"), str) and detail["user"] else "")
    parts.append(f"<ActiveParticipant UserID={_attr(row['actor'] or '-')}{person} "
                 f"UserIsRequestor=\"true\"{_network_point(row.get('source') or '')}>"
                 f"{requestor_role}</ActiveParticipant>")
    parts.append(f"<ActiveParticipant UserID={_attr(config.ae_title)} "
                 f"AlternativeUserID={_attr(os.getpid())} "
                 f"UserIsRequestor=\"false\" NetworkAccessPointID="
                 f"{_attr(socket.gethostname())} NetworkAccessPointTypeCode=\"1\">"
                 f"{own_role}</ActiveParticipant>")
    if other:  # the media of an export or import, or the site pushed to
        parts.append(other)
    site = (f" AuditEnterpriseSiteID={_attr(config.enterprise_site_id)}"
            if config.enterprise_site_id else "")
    parts.append(f"<AuditSourceIdentification{site} "
                 f"AuditSourceID={_attr(config.audit_source_id)}>"
                 "<AuditSourceTypeCode csd-code=\"4\"/></AuditSourceIdentification>")
    for kind in event.objects:
        parts.append(_participant_object(kind, row, detail))
    parts.append("</AuditMessage>")
    return "".join(parts).encode("utf-8")


def sendable_message(row: dict[str, Any], config: AtnaConfig) -> bytes:
    """The audit message of ``row``; should the row itself not make one (a damaged row), a
    message that says so, with what could be read of it, rather than an exception: the sender
    goes on with the rows after it (PS3.15 A.5: every event reaches the repository)."""
    try:
        return audit_message(row, config)
    except Exception as exc:  # noqa: BLE001 - logged without data; a message goes anyway
        log.error("audit row %s could not be written whole (%s); sent without its detail",
                  row.get("seq"), type(exc).__name__)
        bare = {"seq": row.get("seq"), "at": _readable_at(row.get("at")),
                "actor": str(row.get("actor") or "-"), "source": "",
                "action": str(row.get("action") or ""), "outcome": "failure",
                "patient_id": str(row.get("patient_id") or ""),
                "study_uid": str(row.get("study_uid") or ""), "instance_count": 0,
                "detail": json.dumps({"reason": f"audit row {row.get('seq')} unreadable "
                                                f"({type(exc).__name__})"})}
        return audit_message(bare, config)


def _readable_at(value: object) -> datetime | str:
    """``value`` when it is a moment the message can carry, else now (a damaged row is sent,
    with the time it is sent, rather than holding back every row after it)."""
    if isinstance(value, datetime | str):
        try:
            _at_text(value)
            return value
        except (ValueError, TypeError, OverflowError):
            pass
    return datetime.now(UTC)


def syslog_message(xml: bytes, at: datetime | str, app_name: str = "imageshare") -> bytes:
    """An RFC 5424 syslog message carrying ``xml`` (UTF-8 with BOM, as RFC 5424 asks)."""
    host = socket.gethostname()[:255] or "-"
    header = (f"<{PRIORITY}>1 {_at_text(at)} {host} {app_name[:48]} {os.getpid()} {MSGID} - ")
    return header.encode("ascii", "replace") + BOM + xml


def frame(message: bytes) -> bytes:
    """RFC 5425 octet-counting: the length, a space, the message."""
    return b"%d " % len(message) + message


# How long after a batch the connection must still be open for the batch to count as
# delivered (a repository that closed it resets the connection within a round trip).
CONFIRM_SECONDS = 0.05


def _closed(sock: ssl.SSLSocket, wait: float) -> bool:
    """Whether the repository closed (or reset) the connection within ``wait`` seconds. It
    never writes to us, so a readable socket is its close, or a TLS record that carries no
    data (TLS 1.3 session tickets, sent just after a new connection's handshake): such a
    record is read and the wait goes on to its end, or a close seen after it would count the
    batch as delivered."""
    deadline = time.monotonic() + wait
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            readable, _, _ = select.select([sock], [], [], remaining)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        if _read_closed(sock):
            return True
        if remaining <= 0:
            return False


def _read_closed(sock: ssl.SSLSocket) -> bool:
    """Read what made ``sock`` readable without blocking: True if it was the close."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
        return False
    except (OSError, ssl.SSLError):
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


_PENDING_COLUMNS = [type_coerce(c, String).label("at") if c.name == "at" else c
                    for c in audit_events.c]


class AtnaSender:
    """Sends the audit trail, in order, to the audit repository in a background thread."""

    def __init__(self, engine: Engine, config: AtnaConfig, poll_seconds: float = 1.0,
                 retry_seconds: float = 2.0, batch: int = 200, lease_seconds: float = 60.0,
                 confirm_seconds: float = CONFIRM_SECONDS) -> None:
        self._engine = engine
        self._confirm = confirm_seconds
        self._config = config
        self._poll = poll_seconds
        self._retry = retry_seconds
        self._batch = batch
        self._size = batch  # smaller after a connection dropped in the middle of a batch
        self._lease = timedelta(seconds=lease_seconds)
        self._owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: ssl.SSLSocket | None = None
        self._context = self._tls_context()

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self._config.ca_file or None)
        if self._config.client_certificate:
            context.load_cert_chain(self._config.client_certificate,
                                    self._config.client_private_key or None)
        return context

    # -- the lease and the cursor ------------------------------------------------------------

    def _claim(self) -> int | None:
        """Take (or renew) the right to send; the sequence number sent so far, or None."""
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            taken = conn.execute(update(atna_cursor).where(
                atna_cursor.c.id == CURSOR_ROW,
                or_(atna_cursor.c.owner == self._owner, atna_cursor.c.owner == "",
                    atna_cursor.c.lease_until.is_(None), atna_cursor.c.lease_until < now))
                .values(owner=self._owner, lease_until=now + self._lease)).rowcount
            if not taken:
                if conn.execute(sql_select(atna_cursor.c.id)).first() is not None:
                    return None  # another process sends
                conn.execute(atna_cursor.insert().values(  # the migration's row was lost
                    id=CURSOR_ROW, sent_seq=0, owner=self._owner,
                    lease_until=now + self._lease))
            return conn.execute(sql_select(atna_cursor.c.sent_seq)
                                .where(atna_cursor.c.id == CURSOR_ROW)).scalar()

    def _advance(self, seq: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(atna_cursor).where(
                atna_cursor.c.id == CURSOR_ROW, atna_cursor.c.owner == self._owner)
                .values(sent_seq=seq, lease_until=datetime.now(UTC) + self._lease))

    def _release(self) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(atna_cursor).where(
                atna_cursor.c.id == CURSOR_ROW, atna_cursor.c.owner == self._owner)
                .values(owner="", lease_until=None))

    def _pending(self, after: int) -> list[dict[str, Any]]:
        """The next rows to send. The time is read as the database gives it (SQLite: text)
        and parsed when the message is made: one damaged value fails that row's message (sent
        all the same, see :func:`sendable_message`), not the reading of every batch."""
        with self._engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sql_select(*_PENDING_COLUMNS).where(audit_events.c.seq > after)
                .order_by(audit_events.c.seq).limit(self._size)).mappings()]

    # -- the connection -----------------------------------------------------------------------

    def _connected(self) -> ssl.SSLSocket:
        if self._sock is not None:
            if not _closed(self._sock, 0):
                return self._sock
            self._disconnect()
        raw = socket.create_connection((self._config.host, self._config.port), timeout=10)
        try:
            self._sock = self._context.wrap_socket(raw, server_hostname=self._config.host)
        except (OSError, ssl.SSLError):
            raw.close()
            raise
        log.info("connected to the audit repository %s:%s", self._config.host,
                 self._config.port)
        return self._sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _send(self, rows: Iterable[dict[str, Any]]) -> int:
        """Write ``rows`` and return the last sequence number, once the batch is taken to be
        delivered. RFC 5425 has no acknowledgement, and a repository that closes the
        connection (a restart, an idle cut) throws away what it had not read while the
        kernel took our bytes all the same: so nothing of a batch counts as sent unless the
        connection is still open before each message and a moment after the last one.
        Otherwise OSError: the whole batch is sent again (a repository may then see some
        messages twice, never none), in smaller batches until the connection holds one."""
        sock = self._connected()
        last = 0
        try:
            for row in rows:
                if _closed(sock, 0):
                    raise ConnectionResetError("the audit repository closed the connection")
                message = syslog_message(sendable_message(row, self._config),
                                         _readable_at(row["at"]))
                sock.sendall(frame(message))
                last = row["seq"]
            if last and _closed(sock, self._confirm):
                raise ConnectionResetError("the audit repository closed the connection")
        except (OSError, ssl.SSLError):
            self._size = max(1, self._size // 2)
            raise
        self._size = min(self._batch, self._size * 2)
        return last

    # -- the loop -----------------------------------------------------------------------------

    def send_pending(self) -> int:
        """Send what is waiting (if this process holds the lease); returns how many were sent.
        Raises OSError when the repository cannot be reached (nothing is marked sent)."""
        sent = 0
        while not self._stop.is_set():
            after = self._claim()
            if after is None:
                return sent
            rows = self._pending(after)
            if not rows:
                return sent
            last = self._send(rows)
            self._advance(last)
            sent += len(rows)
        return sent

    def _run(self) -> None:
        down = False
        while not self._stop.is_set():
            try:
                self.send_pending()
                if down:
                    log.info("the audit repository is reachable again; backlog sent")
                down = False
                wait = self._poll
            except (OSError, ssl.SSLError) as exc:
                self._disconnect()
                if not down:
                    log.warning("audit repository %s:%s unreachable (%s); events wait in the "
                                "audit trail", self._config.host, self._config.port,
                                type(exc).__name__)
                down = True
                wait = self._retry
            except Exception as exc:  # noqa: BLE001 - the loop must go on; logged without data
                log.error("ATNA sender failed: %s", type(exc).__name__)
                wait = self._retry
            self._stop.wait(wait)

    def start(self) -> AtnaSender:
        """Start sending in a background thread."""
        self._thread = threading.Thread(target=self._run, name="atna-sender", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the batch in flight, close the connection, free the lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            try:
                self._sock.unwrap()
            except (OSError, ssl.SSLError, ValueError):
                pass
        self._disconnect()
        try:
            self._release()
        except Exception:  # noqa: BLE001 - the lease simply expires
            pass
