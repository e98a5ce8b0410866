"""Studies received from other sites: reviewed in the inbox, reconciled to the local patient
(found by NHS number; the local hospital number replaces the sender's, which is kept as an
other patient ID), accepted into the archive (optionally forwarded to the local PACS) or
rejected. Unaccepted items expire with the temporary retention class."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, select, update

from imageshare.archive.corrections import PatientCorrections, PatientDetails
from imageshare.archive.deletion import ArchiveDeletion, Removed
from imageshare.archive.indexing import HELD_PREFIX, file_under_record, summarise_studies
from imageshare.archive.record import REVIEW_CLASSES, patient_in_record
from imageshare.archive.studies import PatientRecord, StudyCatalogue
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound
from imageshare.domain.identifiers import is_valid_nhs_number, normalise_name
from imageshare.storage.index.schema import (
    inbox_items,
    instances,
    nodes,
    patient_identifiers,
    patients,
    series,
    studies,
    users,
)

# Items under this prefix are uploads (imageshare.uploads), decided on their QC page, where
# the uploader is told and the invitation reopened: the exchange inbox neither lists nor
# decides them.
UPLOAD_SITE_PREFIX = "upload:"


def _from_sites() -> Any:
    return inbox_items.c.site.not_like(UPLOAD_SITE_PREFIX + "%")

# Told of each decision (item, "accepted" or "rejected", who, their note): the receipt back.
Decided = Callable[["InboxItem", str, Actor, str], None]


@dataclass(frozen=True)
class InboxItem:
    """A study received from a site, waiting for a decision (or decided)."""

    pk: int
    study_uid: str
    site: str
    status: str
    instances: int
    first_received: datetime
    last_received: datetime
    decided_by: str
    decided_at: datetime | None
    note: str
    origin: str = ""  # the sending ImageShare's AE title (from its announcement)
    sender_name: str = ""
    priority: str = "routine"
    message: str = ""  # the sender's note
    contact: str = ""
    transfer_id: str = ""  # the sender's transfer (a receipt goes back to it)
    request_id: str = ""  # our request for prior imaging it answers
    announced_at: datetime | None = None
    receipt_state: str = ""
    receipt_detail: str = ""


log = logging.getLogger(__name__)
# An item being decided: claimed by one decision (no other may take it), not yet done. A stop
# on the way leaves it so; the next start gives it back to the queue (release_unfinished).
ACCEPTING, REJECTING = "accepting", "rejecting"
UNFINISHED_AFTER = timedelta(hours=1)  # no decision takes this long


def _claim(conn: Connection, pk: int, status: str, actor: Actor, note: str) -> None:
    """Decide the pending item ``pk``; raises ImageShareError when it is no longer pending
    (someone else decided it meanwhile)."""
    claimed = conn.execute(update(inbox_items).where(
        inbox_items.c.pk == pk, inbox_items.c.status == "pending").values(
        status=status, decided_by=actor.name, decided_at=datetime.now(UTC),
        note=note[:2000])).rowcount
    if claimed != 1:
        raise ImageShareError("this item was decided already")


class Inbox:
    """Review, reconcile, accept or reject received studies."""

    def __init__(self, engine: Engine, catalogue: StudyCatalogue,
                 corrections: PatientCorrections, deletion: ArchiveDeletion,
                 audit: AuditTrail) -> None:
        self._engine = engine
        self._catalogue = catalogue
        self._corrections = corrections
        self._deletion = deletion
        self._audit = audit
        self._decided: list[Decided] = []

    def on_decided(self, decided: Decided) -> None:
        """Call ``decided`` after each accept or reject (the receipt to the sender)."""
        self._decided.append(decided)

    def _tell(self, item: InboxItem, outcome: str, actor: Actor, note: str) -> None:
        item = replace(item, status=outcome, decided_by=actor.name,
                       decided_at=datetime.now(UTC), note=note[:2000])
        for decided in self._decided:
            decided(item, outcome, actor, note)

    def counts(self) -> tuple[int, list[InboxItem]]:
        """How many items wait for a decision, and the urgent ones among them (newest
        first): for the inbox count and the urgent-arrival banner of every staff page."""
        with self._engine.connect() as conn:
            pending = conn.execute(select(func.count()).select_from(inbox_items).where(
                inbox_items.c.status == "pending", _from_sites())).scalar() or 0
            urgent = conn.execute(select(inbox_items).where(
                inbox_items.c.status == "pending", inbox_items.c.priority == "urgent",
                _from_sites())
                .order_by(inbox_items.c.last_received.desc()).limit(5)).mappings().all()
        return int(pending), [InboxItem(**dict(r)) for r in urgent]

    def items(self, status: str = "pending") -> list[InboxItem]:
        """Items from other sites with ``status``, newest first (uploads are not listed)."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(inbox_items).where(inbox_items.c.status == status,
                                                          _from_sites())
                                .order_by(inbox_items.c.last_received.desc())).mappings().all()
        return [InboxItem(**dict(r)) for r in rows]

    def _decidable(self, pk: int, upload_review: bool) -> InboxItem:
        item = self.item(pk)
        if item.site.startswith(UPLOAD_SITE_PREFIX) and not upload_review:
            raise ImageShareError("this is an upload: accept or reject it on its page under "
                                  "Uploads, where the uploader is told")
        return item

    def item(self, pk: int) -> InboxItem:
        """One item; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(inbox_items).where(inbox_items.c.pk == pk)
                               ).mappings().first()
        if row is None:
            raise NotFound("no such inbox item")
        return InboxItem(**dict(row))

    def local_match(self, item: InboxItem) -> PatientRecord | None:
        """The local patient with the same NHS number as the received study, if any (another
        record than the one the study is filed under); for a study held because its Patient
        ID is on record here, that record (when another hospital sent it, only if it may be
        the same person: no other birth date or family name)."""
        received = self._catalogue.record(item.study_uid).patient
        if received.issuer.startswith(HELD_PREFIX):  # held: the record of its own Patient ID
            with self._engine.connect() as conn:
                uid = conn.execute(
                    select(studies.c.study_uid).join(patients,
                                                     patients.c.pk == studies.c.patient_pk)
                    .where(patients.c.patient_id == received.patient_id,
                           patients.c.issuer == received.issuer[len(HELD_PREFIX):])
                    .order_by(studies.c.pk).limit(1)).scalar()
            if not uid:
                return None
            # Held because its patient differs from that record. Our own modality's study is
            # filed there (a name typed wrong in an emergency); the same Patient ID at
            # another hospital is often another person: filed there only when it may be.
            local = self._catalogue.record(uid).patient
            if self._from_other_hospital(item) and not _may_be_same_person(received, local):
                return None
            return local
        nhs = received.nhs_number or (received.patient_id if _looks_nhs(received) else "")
        if not nhs:
            return None
        with self._engine.connect() as conn:
            found = conn.execute(
                select(patients.c.pk, func.min(studies.c.study_uid))
                .join(studies, patients.c.pk == studies.c.patient_pk)
                .where(patients.c.pk != received.pk, patient_in_record(patients.c.pk))
                .where((patients.c.patient_id == nhs) | patients.c.pk.in_(
                    select(patient_identifiers.c.patient_pk)
                    .where(patient_identifiers.c.value == nhs)))
                .group_by(patients.c.pk).limit(2)).all()
        if len(found) != 1:  # none, or several records with this NHS number: a person decides
            return None
        local = self._catalogue.record(found[0][1]).patient
        return local if _may_be_same_person(received, local) else None

    def _from_other_hospital(self, item: InboxItem) -> bool:
        """Whether another hospital sent the item: a node registered with an inbox, or a
        connected ImageShare's site account (not our own modalities or staff)."""
        with self._engine.connect() as conn:
            return conn.execute(select(nodes.c.pk).where(
                nodes.c.ae_title == item.site, nodes.c.inbox.is_(True))).first() is not None \
                or conn.execute(select(users.c.pk).where(
                    users.c.username == item.site, users.c.role == "site")).first() is not None

    def accept(self, pk: int, actor: Actor, reconcile: bool = True, note: str = "",
               upload_review: bool = False, sop_uids: Collection[str] | None = None,
               prepare: Callable[[InboxItem], str] | None = None) -> str:
        """Accept into the archive; with ``reconcile`` the study is filed under the local
        patient found by NHS number. Returns what was done, for people. An upload is
        accepted only by its QC (``upload_review``), and only its instances ``sop_uids``
        (the files it sent) enter the record; ``prepare`` (the QC's filing under the invited
        patient) runs once the item is this decision's, and says what it did.

        The item is claimed before anything changes: of two decisions at once (two people,
        two processes) one wins and the other changes nothing, not even the patient's
        details. A failure on the way gives the item back to the queue, pending."""
        item = self._decidable(pk, upload_review)
        if item.status != "pending":
            raise ImageShareError("this item was decided already")
        with self._engine.begin() as conn:
            _claim(conn, pk, ACCEPTING, actor, note)
        try:
            done = self._file(item, actor, reconcile, sop_uids, prepare)
        except BaseException:
            with self._engine.begin() as conn:
                conn.execute(update(inbox_items).where(inbox_items.c.pk == pk).values(
                    status="pending", decided_by="", decided_at=None, note=item.note))
            raise
        self._tell(item, "accepted", actor, note)
        return done

    def _file(self, item: InboxItem, actor: Actor, reconcile: bool,
              sop_uids: Collection[str] | None,
              prepare: Callable[[InboxItem], str] | None) -> str:
        """The work of an accepted item: reconciled (or ``prepare``d), then its instances
        made part of the record, audited."""
        done = "accepted"
        if prepare is not None:
            done = prepare(item)
        elif reconcile:
            local = self.local_match(item)
            if local is not None:
                received = self._catalogue.record(item.study_uid).patient
                self._corrections.correct_study(
                    item.study_uid, replace(PatientDetails.of(local), other_ids=(
                        (received.patient_id, item.site),)),
                    f"reconciled from {item.site}: their ID {received.patient_id}", actor)
                if not received.issuer.startswith(HELD_PREFIX):
                    self._keep_sender_id(item, received.patient_id)
                done = f"reconciled to hospital number {local.patient_id} and accepted"
            elif self._catalogue.record(item.study_uid).patient.issuer.startswith(HELD_PREFIX):
                done = ("accepted as sent, held for reconciliation: its patient is not the "
                        "one on record under the same Patient ID")
        if sop_uids is None:
            sop_uids = self.sent_by(item)
        with self._engine.begin() as conn:
            chosen: ColumnElement[bool] = instances.c.series_pk.in_(
                select(series.c.pk).join(studies, studies.c.pk == series.c.study_pk)
                .where(studies.c.study_uid == item.study_uid))
            chosen = and_(chosen, instances.c.sop_uid.in_(sorted(sop_uids)))
            study_pks = list(conn.execute(select(studies.c.pk).where(
                studies.c.study_uid == item.study_uid)).scalars())
            for study_pk in study_pks:  # a patient we had no record of: one now
                file_under_record(conn, study_pk)
            conn.execute(update(instances).where(
                chosen, instances.c.retention_class.in_(REVIEW_CLASSES)).values(
                    retention_class="clinical"))
            summarise_studies(conn, study_pks, datetime.now(UTC))
            self._audit.record(AuditEvent(actor=actor, action="inbox.accept",
                                          outcome="success", study_uid=item.study_uid,
                                          detail={"site": item.site, "done": done}), conn=conn)
            # Decided with the instances' move into the record, in one commit (an arrival
            # meanwhile opened the item for review again: it stays pending).
            conn.execute(update(inbox_items).where(
                inbox_items.c.pk == item.pk, inbox_items.c.status == ACCEPTING)
                .values(status="accepted"))
        return done

    def sent_by(self, item: InboxItem) -> set[str]:
        """The instances of the item's study waiting for review that its site sent (not
        another site's, nor an upload's, in the same study). Instances recorded before
        senders were told apart (an address alone) count as the item's."""
        with self._engine.connect() as conn:
            return set(conn.execute(select(instances.c.sop_uid).join(
                series, series.c.pk == instances.c.series_pk).join(
                studies, studies.c.pk == series.c.study_pk).where(
                studies.c.study_uid == item.study_uid,
                instances.c.retention_class.in_(REVIEW_CLASSES),
                instances.c.received_from.startswith(f"{item.site}@", autoescape=True)
                | instances.c.received_from.not_like("%@%"))).scalars())

    def _keep_sender_id(self, item: InboxItem, sender_id: str) -> None:
        """Keep the sending site's patient ID as an other patient ID of the local record."""
        with self._engine.begin() as conn:
            patient_pk = conn.execute(select(studies.c.patient_pk).where(
                studies.c.study_uid == item.study_uid)).scalar()
            exists = conn.execute(select(patient_identifiers.c.pk).where(and_(
                patient_identifiers.c.patient_pk == patient_pk,
                patient_identifiers.c.value == sender_id,
                patient_identifiers.c.issuer == item.site))).scalar()
            if patient_pk is not None and exists is None:
                conn.execute(patient_identifiers.insert().values(
                    patient_pk=patient_pk, value=sender_id[:64], issuer=item.site[:64],
                    kind="TEXT"))

    def release_unfinished(self, now: datetime | None = None) -> int:
        """Give back to the queue (pending) the items whose decision a stop interrupted
        (claimed more than an hour ago, never finished); returns how many."""
        moment = now or datetime.now(UTC)
        with self._engine.begin() as conn:
            released = conn.execute(update(inbox_items).where(
                inbox_items.c.status.in_((ACCEPTING, REJECTING)),
                inbox_items.c.decided_at < moment - UNFINISHED_AFTER).values(
                status="pending", decided_by="", decided_at=None)).rowcount
        if released:
            log.warning("%d inbox decision(s) interrupted by a stop are pending again",
                        released)
        return released

    def reject(self, pk: int, actor: Actor, note: str = "",
               upload_review: bool = False, sop_uids: Collection[str] | None = None) -> Removed:
        """Reject: the received instances are deleted (audited). An upload is rejected only
        by its QC (``upload_review``), and only its instances ``sop_uids`` go."""
        item = self._decidable(pk, upload_review)
        if item.status != "pending":
            raise ImageShareError("this item was decided already")
        # Decided first (the item stays, with its receipt, as the record of the decision);
        # pending again if the deletion fails.
        with self._engine.begin() as conn:
            _claim(conn, pk, REJECTING, actor, note)
        try:
            why = f"rejected from the inbox: {note}"[:200]
            removed = self._deletion.instances(
                set(self.sent_by(item) if sop_uids is None else sop_uids), actor, why,
                only_classes=REVIEW_CLASSES)
        except Exception:
            with self._engine.begin() as conn:
                conn.execute(update(inbox_items).where(inbox_items.c.pk == pk).values(
                    status="pending", decided_by="", decided_at=None, note=item.note))
            raise
        with self._engine.begin() as conn:
            self._audit.record(AuditEvent(actor=actor, action="inbox.reject",
                                          outcome="success", study_uid=item.study_uid,
                                          instance_count=removed.instances,
                                          detail={"site": item.site}), conn=conn)
            conn.execute(update(inbox_items).where(
                inbox_items.c.pk == pk, inbox_items.c.status == REJECTING)
                .values(status="rejected"))
        self._tell(item, "rejected", actor, note)
        return removed


def _looks_nhs(patient: PatientRecord) -> bool:
    return is_valid_nhs_number(patient.patient_id)


def _may_be_same_person(received: PatientRecord, local: PatientRecord) -> bool:
    """Whether a received study's patient may be the local one its NHS number points at:
    not when both give a birth date and they differ, nor when both give a family name and
    they differ (filing it there is then a person's decision)."""
    if received.birth_date and local.birth_date and received.birth_date != local.birth_date:
        return False
    family = [normalise_name(p.name).split("^")[0].strip() for p in (received, local)]
    return not (family[0] and family[1] and family[0] != family[1])
