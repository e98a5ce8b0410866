"""Audit events and the one function that records them (in the same transaction as the work)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, or_, select
from sqlalchemy.exc import SQLAlchemyError

from imageshare.audit.chain import append
from imageshare.audit.events import CATALOGUE
from imageshare.audit.repeats import RepeatWindow
from imageshare.domain.actors import Actor
from imageshare.domain.errors import AuditUnavailable, UnknownAuditEvent
from imageshare.storage.index.schema import audit_events, patients, studies

Outcome = Literal["success", "failure", "refused", "warning"]
log = logging.getLogger("imageshare.audit")
# The detail key that carries the Issuer of Patient ID of the event's patient_id: a patient
# ID is unique only with its issuer (DICOM (0010,0021); ATNA writes the two as one CX value).
PATIENT_ISSUER = "patient_issuer"
# A study of another site waiting in the inbox is filed under issuer "inbox:" + the issuer
# it was sent with (imageshare.archive.indexing.INBOX_PREFIX): the audit names the latter.
_INBOX_PREFIX = "inbox:"


@dataclass(frozen=True)
class AuditEvent:
    """One access or change of patient data: who, what, which patient/study, outcome, detail.
    ``issuer``: the Issuer of Patient ID of ``patient_id`` (kept in the detail as
    ``patient_issuer``; "" when it has none); when not given (None) for an event naming a
    study, the trail takes it from the study's patient record (when that record has this
    patient ID)."""

    actor: Actor
    action: str
    outcome: Outcome
    patient_id: str = ""
    study_uid: str = ""
    instance_count: int = 0
    detail: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    issuer: str | None = None

    def row(self, issuer: str = "") -> dict[str, Any]:
        """The audit table row for this event (``issuer``: the patient ID's issuer when the
        event gives none). Text from the outside (a user name, an AE title, a UID) is kept
        with each NUL written as U+FFFD: PostgreSQL refuses NUL in text, and the write of the
        event, with the request it records, would fail on it."""
        detail = self.detail
        issuer = self.issuer if self.issuer is not None else issuer
        if issuer and self.patient_id and PATIENT_ISSUER not in detail:
            detail = {**detail, PATIENT_ISSUER: issuer[:64]}
        return {
            "at": _utc(self.at),
            "actor": _storable(self.actor.label, 128),
            "actor_kind": self.actor.kind,
            "source": _storable(self.actor.source, 255),
            "action": self.action,
            "outcome": self.outcome,
            "patient_id": _storable(self.patient_id, 64),
            "study_uid": _storable(self.study_uid, 64),
            "instance_count": self.instance_count,
            "detail": json.dumps(detail, sort_keys=True, default=str),
        }


def _repeat_key(event: AuditEvent) -> tuple[str, ...]:
    """What makes two accesses one viewing: who, from where, what, which patient and study."""
    return (event.actor.label, event.actor.source, event.action, event.patient_id,
            event.study_uid)


def _utc(at: datetime) -> datetime:
    """``at`` as a UTC moment (a naive one taken as UTC). SQLite keeps a moment's wall-clock
    time without its zone: a moment given in another zone came back hours off, and the
    chain, hashed over the UTC moment, then called the row edited."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def _storable(value: str | None, limit: int) -> str:
    """``value`` cut to ``limit`` characters, each NUL replaced by U+FFFD."""
    return (value or "")[:limit].replace("\x00", "\ufffd")


class AuditTrail:
    """Records audit events. If recording fails, the operation that asked for it fails too."""

    def __init__(self, engine: Engine, repeat_seconds: float = 0.0) -> None:
        self._engine = engine
        self._repeats = RepeatWindow(repeat_seconds)

    def record(
        self, event: AuditEvent | list[AuditEvent], conn: Connection | None = None,
        repeatable: bool = False,
    ) -> None:
        """Write one event or several; inside ``conn``'s transaction when given, else in its own
        (then a database that cannot take the write raises :class:`AuditUnavailable`). An
        action that is not in the catalogue (:mod:`imageshare.audit.events`) is refused with
        :class:`UnknownAuditEvent` and nothing is written. ``repeatable``: the events are
        part of a viewing (a frame, a rendering, a thumbnail): a success already recorded
        for the same actor, address, action, patient and study within the repeat window
        (``audit_view_window_seconds``) is not written again; failures always are."""
        batch = event if isinstance(event, list) else [event]
        for e in batch:
            if e.action not in CATALOGUE:
                raise UnknownAuditEvent(
                    f"audit action {e.action[:64]!r} is not in the event catalogue")
        if repeatable:
            batch = [e for e in batch if e.outcome != "success"
                     or not self._repeats.seen(_repeat_key(e))]
        if not batch:
            return
        if conn is not None:
            append(conn, _rows(conn, batch))
        else:
            try:
                with self._engine.begin() as own:
                    append(own, _rows(own, batch))
            except SQLAlchemyError as exc:
                log.error("audit trail cannot be written: %s", type(exc).__name__)
                raise AuditUnavailable(
                    "the audit trail cannot be written (database unavailable or disk full); "
                    "nothing is served until it can") from exc
        for e in batch:
            if repeatable and e.outcome == "success":
                self._repeats.note(_repeat_key(e))
            log.debug("audit %s %s %s", e.actor.label, e.action, e.outcome)

    def events(
        self, action: str | None = None, study_uid: str | None = None, limit: int = 1000,
        detail: tuple[str, str] | None = None, text: str = "",
    ) -> Iterator[dict[str, Any]]:
        """Recorded events, newest first, optionally filtered (``detail``: a key and the text
        value it must have; ``text``: contained, in any case, in who, the address, the
        patient ID, the study UID or the detail; ``%`` and ``_`` in either are matched as
        themselves, not as LIKE wildcards that would let other events take the places of
        the ``limit``)."""
        query = select(audit_events).order_by(audit_events.c.pk.desc()).limit(limit)
        text = _as_stored(text)
        sqlite = self._engine.dialect.name == "sqlite"
        if text:
            query = query.where(_naming(text, folded_here=sqlite and not text.isascii()))
        if detail is not None:
            query = query.where(audit_events.c.detail.contains(
                json.dumps({detail[0]: detail[1]}, sort_keys=True)[1:-1], autoescape=True))
        if action:
            query = query.where(audit_events.c.action == _as_stored(action))
        if study_uid:
            query = query.where(audit_events.c.study_uid == _as_stored(study_uid))
        with self._engine.connect() as conn:
            if sqlite:
                _add_folding(conn)
            for row in conn.execute(query).mappings():
                item = dict(row)
                item["detail"] = json.loads(item["detail"] or "{}")
                yield item


def _as_stored(text: str) -> str:
    """Asked-for text as a column can hold it: each NUL as U+FFFD (as :func:`_storable`
    writes it), and each lone surrogate (not Unicode text) as U+FFFD too: the database would
    refuse the query rather than find nothing."""
    return "".join("\ufffd" if c == "\x00" or "\ud800" <= c <= "\udfff" else c
                   for c in text)


_PLAIN_COLUMNS = (audit_events.c.actor, audit_events.c.source, audit_events.c.patient_id,
                  audit_events.c.study_uid)


def _naming(text: str, folded_here: bool) -> ColumnElement[bool]:
    """Events whose who, address, patient ID, study UID or detail contains ``text`` in any
    case, ``%`` and ``_`` as themselves. The detail column holds JSON (non-ASCII letters,
    quotes and control characters escaped), so it is searched for ``text`` as JSON writes
    it. ``folded_here``: SQLite, whose lower() folds ASCII letters only, folds with Python's
    (:func:`_add_folding`), so that ``JOSÉ`` finds ``josé``."""
    lowered = text.lower()
    if folded_here:
        return or_(*(func.imageshare_fold(c).contains(lowered, autoescape=True)
                     for c in _PLAIN_COLUMNS),
                   func.imageshare_fold_json(audit_events.c.detail).contains(
                       json.dumps(lowered, ensure_ascii=False)[1:-1], autoescape=True))
    return or_(*(c.icontains(lowered, autoescape=True) for c in _PLAIN_COLUMNS),
               audit_events.c.detail.icontains(json.dumps(lowered)[1:-1], autoescape=True))


def _fold(value: str | None) -> str:
    return (value or "").lower()


def _fold_json(value: str | None) -> str:
    """The JSON text ``value`` with its escaped letters written out, in lower case."""
    value = value or ""
    if "\\u" not in value:
        return value.lower()
    try:
        return json.dumps(json.loads(value), sort_keys=True, ensure_ascii=False).lower()
    except ValueError:
        return value.lower()


def _add_folding(conn: Connection) -> None:
    """Give this SQLite connection the Unicode lower-casing :func:`_naming` uses."""
    raw = conn.connection.driver_connection
    if raw is not None:
        raw.create_function("imageshare_fold", 1, _fold, deterministic=True)
        raw.create_function("imageshare_fold_json", 1, _fold_json, deterministic=True)


def _rows(conn: Connection, batch: list[AuditEvent]) -> list[dict[str, Any]]:
    """The rows of ``batch``, each naming a study's patient with the Issuer of Patient ID of
    that patient's record (read in ``conn``: also a record made in the same transaction)."""
    wanted = {(e.study_uid, e.patient_id) for e in batch
              if e.study_uid and e.patient_id and e.issuer is None
              and "\x00" not in e.study_uid + e.patient_id}  # (PostgreSQL refuses NUL)
    issuers: dict[tuple[str, str], str] = {}
    pairs = sorted(wanted)
    for start in range(0, len(pairs), 100):
        found = conn.execute(
            select(studies.c.study_uid, patients.c.patient_id, patients.c.issuer,
                   patients.c.attrs)
            .join(patients, studies.c.patient_pk == patients.c.pk)
            .where(or_(*(and_(studies.c.study_uid == study, patients.c.patient_id == patient)
                         for study, patient in pairs[start:start + 100]))))
        for study, patient, issuer, attrs in found:
            issuers[(study, patient)] = issuer_as_sent(str(issuer or ""), attrs)
    return [e.row(issuers.get((e.study_uid, e.patient_id), "")) for e in batch]


def issuer_as_sent(issuer: str, attrs: Any) -> str:
    """The Issuer of Patient ID of a stored record: a study waiting in the inbox is kept
    under ``inbox:`` + its issuer (cut to fit); the issuer as sent is in its attributes."""
    if not issuer.startswith(_INBOX_PREFIX):
        return issuer
    element = attrs.get("00100021") if isinstance(attrs, dict) else None
    sent = (element.get("Value") or []) if isinstance(element, dict) else []
    return str(sent[0]) if sent else issuer[len(_INBOX_PREFIX):]
