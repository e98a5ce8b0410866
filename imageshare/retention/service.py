"""Retention as a service: the class each arrival gets (policy rules), legal holds, deletion
of a study by two administrators, the expiry job, and what a study page shows about it."""

from __future__ import annotations

import secrets
import threading
import time as wall
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Select,
    and_,
    delete,
    func,
    or_,
    select,
    update,
)

from imageshare.archive.deletion import ArchiveDeletion, Removed, as_utc
from imageshare.archive.indexing import issuers_standing_for
from imageshare.archive.record import instance_in_record
from imageshare.archive.rejections import rejected_in
from imageshare.archive.tombstones import release_kept
from imageshare.audit.trail import AuditEvent, AuditTrail, issuer_as_sent
from imageshare.domain.actors import Actor
from imageshare.domain.errors import DeletionRefused, Forbidden, ImageShareError, NotFound
from imageshare.domain.retention import (
    Clock,
    RetentionClass,
    RetentionPeriods,
    class_help,
    deletion_verdict,
    earliest_deletion,
)
from imageshare.retention.facts import (
    former_patients,
    held_away,
    instance_facts,
    study_on_hold,
)
from imageshare.storage.index.schema import (
    deletion_requests,
    instances,
    legal_holds,
    patients,
    retention_rules,
    series,
    studies,
)

RuleKind = Literal["source", "modality", "collection", "case_type"]
RULE_KINDS: tuple[RuleKind, ...] = ("source", "modality", "collection", "case_type")
# Classes a policy rule may give (inbox, held and upload are given by how things arrive, and
# keep them out of the record until a person decides).
RULE_CLASSES = (RetentionClass.CLINICAL, RetentionClass.TEMPORARY, RetentionClass.TEACHING,
                RetentionClass.RESEARCH)
# Policy rules are read again after this many seconds (other instances may have changed them).
RULES_REFRESH_SECONDS = 30.0
# A pending deletion request being approved is marked (``decided_by``) with this prefix and
# the approver's name; a mark older than APPROVAL_STALE is of an approval that died.
APPROVING = "approving:"
APPROVAL_STALE = timedelta(hours=1)


@dataclass(frozen=True)
class RetentionRule:
    """Arrivals matching ``kind`` = ``value`` get ``retention_class``."""

    kind: str
    value: str
    retention_class: str
    created_by: str
    created_at: datetime


@dataclass(frozen=True)
class LegalHold:
    """A hold on a patient (``patient_id``, ``issuer``) or on one study (``study_uid``)."""

    public_id: str
    patient_id: str
    issuer: str
    study_uid: str
    reason: str
    placed_by: str
    placed_at: datetime
    lifted_by: str
    lifted_at: datetime | None
    lift_reason: str

    @property
    def in_force(self) -> bool:
        """Not lifted."""
        return self.lifted_at is None

    @property
    def covers(self) -> str:
        """What the hold covers, for people."""
        if self.study_uid:
            return f"study {self.study_uid}"
        return f"patient {self.patient_id}" + (f" ({self.issuer})" if self.issuer else "")


@dataclass(frozen=True)
class DeletionRequest:
    """A study's deletion asked for by one administrator, for another to approve."""

    public_id: str
    study_uid: str
    patient_id: str
    reason: str
    state: str
    requested_by: str
    requested_at: datetime
    decided_by: str
    decided_at: datetime | None
    note: str
    deleted: int
    patient_issuer: str = ""


@dataclass(frozen=True)
class ClassCount:
    """How many instances of a study are in one class, and when they may go at the earliest."""

    retention_class: str
    instances: int
    explanation: str
    earliest: datetime | None


@dataclass(frozen=True)
class StudyRetention:
    """What a study page shows: classes, holds in force, and whether deletion is possible."""

    classes: list[ClassCount]
    holds: list[LegalHold]
    deletable_now: bool
    why_not: str


class RetentionService:
    """Policy rules, legal holds, two-administrator deletion and the expiry job."""

    def __init__(self, engine: Engine, deletion: ArchiveDeletion, audit: AuditTrail,
                 is_admin: Callable[[str], bool]) -> None:
        self._engine = engine
        self._deletion = deletion
        self._audit = audit
        self._is_admin = is_admin
        self._rules: dict[tuple[str, str], str] = {}
        self._rules_read = float("-inf")
        self._lock = threading.Lock()

    @property
    def periods(self) -> RetentionPeriods:
        """How long each class keeps its images here."""
        return self._deletion.periods

    @property
    def clock(self) -> Clock:
        """The clock every retention decision reads."""
        return self._deletion.clock

    # -- the expiry job ------------------------------------------------------------------

    def run(self, actor: Actor, now: datetime | None = None) -> Removed:
        """Delete what its class lets go at ``now`` (default: the clock's present); holds and
        classes that keep their images are respected, the rest is counted as kept."""
        return self._deletion.expired(actor, now)

    def mark_reviewed(self, study_uid: str, at: datetime | None = None) -> int:
        """The quality review of an uploaded study happened at ``at``: its upload period
        starts. Returns the instances marked."""
        moment = at or self.clock()
        with self._engine.begin() as conn:
            return conn.execute(update(instances).where(
                instances.c.series_pk.in_(_series_of(study_uid)),
                instances.c.retention_class == RetentionClass.UPLOAD.value,
                instances.c.class_since.is_(None)).values(class_since=moment)).rowcount

    # -- policy rules --------------------------------------------------------------------

    def rules(self) -> list[RetentionRule]:
        """Every policy rule, by kind and value."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(retention_rules).order_by(
                retention_rules.c.kind, retention_rules.c.value)).mappings().all()
        return [RetentionRule(r["kind"], r["value"], r["retention_class"], r["created_by"],
                              r["created_at"]) for r in rows]

    def set_rule(self, kind: str, value: str, retention_class: str, actor: Actor) -> None:
        """Arrivals matching ``kind`` = ``value`` get ``retention_class`` from now on."""
        value = value.strip()
        if kind not in RULE_KINDS:
            raise ImageShareError(f"a rule matches one of: {', '.join(RULE_KINDS)}")
        if retention_class not in {c.value for c in RULE_CLASSES}:
            raise ImageShareError("a rule gives one of the classes: "
                                  + ", ".join(c.value for c in RULE_CLASSES))
        if not value or len(value) > 128:
            raise ImageShareError("a rule needs a value of at most 128 characters")
        if retention_class != RetentionClass.CLINICAL.value and kind in ("source", "modality"):
            with self._engine.connect() as conn:
                record = _clinical_from(conn, kind, value)
            if record:
                self._audit.record(AuditEvent(
                    actor=actor, action="retention.rule.set", outcome="failure",
                    detail={"kind": kind, "value": value, "class": retention_class,
                            "reason": f"{record} clinical image(s) came this way"}))
                raise ImageShareError(
                    f"{record} image(s) in the patient record "
                    f"{'came from' if kind == 'source' else 'are of'} {kind} {value}: a "
                    f"rule making its arrivals {retention_class} would let the retention "
                    "task delete the record's new images from it. Rules that expire images "
                    "are for sources that send only copies (another site, a research or "
                    "teaching system)")
        with self._engine.begin() as conn:
            before = conn.execute(select(retention_rules.c.retention_class).where(
                retention_rules.c.kind == kind, retention_rules.c.value == value)).scalar()
            conn.execute(delete(retention_rules).where(retention_rules.c.kind == kind,
                                                       retention_rules.c.value == value))
            conn.execute(retention_rules.insert().values(
                kind=kind, value=value, retention_class=retention_class,
                created_by=actor.name[:128], created_at=self.clock()))
            self._audit.record(AuditEvent(actor=actor, action="retention.rule.set",
                                          outcome="success", detail={
                                              "kind": kind, "value": value,
                                              "class": retention_class,
                                              "before": before or "clinical (no rule)"}),
                               conn=conn)
        self._rules_read = float("-inf")

    def remove_rule(self, kind: str, value: str, actor: Actor) -> None:
        """Remove a policy rule (arrivals matching it are clinical again)."""
        with self._engine.begin() as conn:
            before = conn.execute(select(retention_rules.c.retention_class).where(
                retention_rules.c.kind == kind, retention_rules.c.value == value)).scalar()
            gone = conn.execute(delete(retention_rules).where(
                retention_rules.c.kind == kind, retention_rules.c.value == value)).rowcount
            if not gone:
                raise NotFound("no such rule")
            self._audit.record(AuditEvent(actor=actor, action="retention.rule.remove",
                                          outcome="success",
                                          detail={"kind": kind, "value": value,
                                                  "before": before or "",
                                                  "class": "clinical (no rule)"}), conn=conn)
        self._rules_read = float("-inf")

    def class_for(self, source: str = "", modality: str = "", collection: str = "",
                  case_type: str = "") -> str:
        """The class policy gives an arrival (``clinical`` when no rule matches). The most
        specific rule wins: case type, collection, source, then modality."""
        with self._lock:
            if wall.monotonic() - self._rules_read > RULES_REFRESH_SECONDS:
                self._rules = {(r.kind, r.value): r.retention_class for r in self.rules()}
                self._rules_read = wall.monotonic()
            rules = self._rules
        for kind, value in (("case_type", case_type), ("collection", collection),
                            ("source", source), ("modality", modality)):
            if value and (kind, value) in rules:
                return rules[(kind, value)]
        return RetentionClass.CLINICAL.value

    def arrival_class(self, actor: Actor, modality: str) -> str:
        """The class of an instance ``actor`` stores (not from a site's inbox)."""
        return self.class_for(source=actor.name, modality=modality)

    # -- legal holds ---------------------------------------------------------------------

    def place_hold(self, actor: Actor, reason: str, patient_id: str = "", issuer: str = "",
                   study_uid: str = "") -> LegalHold:
        """Place a legal hold on a patient or a study: nothing it covers is deleted until it
        is lifted."""
        self._require_admin(actor)
        reason = reason.strip()
        if not reason:
            raise ImageShareError("a legal hold needs a reason")
        if bool(patient_id.strip()) == bool(study_uid.strip()):
            raise ImageShareError("a legal hold covers either a patient or a study")
        public_id = secrets.token_hex(8)
        with self._engine.begin() as conn:
            # The hold is written first, then what it covers is looked for: on SQLite the
            # write waits for a deletion under way (one writer at a time), which then has
            # gone; on PostgreSQL the look locks the rows a deletion locks before it reads
            # the holds (facts.lock_against_holds). Either the deletion finished first and
            # the study is gone (NotFound, nothing placed), or it sees this hold.
            conn.execute(legal_holds.insert().values(
                public_id=public_id, patient_id=patient_id.strip()[:64],
                issuer=issuer.strip()[:64], study_uid=study_uid.strip()[:64],
                reason=reason[:2000], placed_by=actor.name[:128], placed_at=self.clock()))
            if study_uid and not conn.execute(select(studies.c.pk).where(
                    studies.c.study_uid == study_uid.strip()).with_for_update()).all():
                raise NotFound("no such study")
            if patient_id:
                theirs = (patients.c.patient_id == patient_id.strip(),
                          patients.c.issuer.in_(issuers_standing_for(issuer.strip())))
                conn.execute(select(studies.c.pk).join(
                    patients, patients.c.pk == studies.c.patient_pk).where(*theirs)
                    .order_by(studies.c.pk).with_for_update(of=studies)).all()
                if conn.execute(select(patients.c.pk).where(*theirs)).first() is None:
                    raise NotFound("no such patient")
            self._audit.record(AuditEvent(
                actor=actor, action="retention.hold.place", outcome="success",
                patient_id=patient_id.strip(), study_uid=study_uid.strip(),
                detail={"hold": public_id, "reason": reason[:200]}), conn=conn)
        return self.hold(public_id)

    def lift_hold(self, public_id: str, actor: Actor, reason: str) -> LegalHold:
        """Lift a hold (kept, with who lifted it and why)."""
        self._require_admin(actor)
        if not reason.strip():
            raise ImageShareError("say why the hold is lifted")
        hold = self.hold(public_id)
        if not hold.in_force:
            raise ImageShareError("this hold was lifted already")
        with self._engine.begin() as conn:
            # Only a hold still in force: two administrators lifting it at once do not both
            # (the second would overwrite who lifted it and why, and be audited twice).
            if not conn.execute(update(legal_holds).where(
                    legal_holds.c.public_id == public_id, legal_holds.c.lifted_at.is_(None))
                    .values(lifted_by=actor.name[:128], lifted_at=self.clock(),
                            lift_reason=reason.strip()[:2000])).rowcount:
                raise ImageShareError("this hold was lifted already")
            released = release_kept(conn, study_on_hold)
            self._audit.record(AuditEvent(
                actor=actor, action="retention.hold.lift", outcome="success",
                patient_id=hold.patient_id, study_uid=hold.study_uid,
                detail={"hold": public_id, "reason": reason.strip()[:200],
                        **({"originals_released": released} if released else {})}), conn=conn)
        if released:
            self._deletion.remove_released()
        return self.hold(public_id)

    def hold(self, public_id: str) -> LegalHold:
        """One hold; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(legal_holds).where(
                legal_holds.c.public_id == public_id)).mappings().first()
        if row is None:
            raise NotFound("no such legal hold")
        return _hold(row)

    def holds(self, in_force_only: bool = True) -> list[LegalHold]:
        """Legal holds, newest first."""
        stmt = select(legal_holds).order_by(legal_holds.c.placed_at.desc(), legal_holds.c.pk)
        if in_force_only:
            stmt = stmt.where(legal_holds.c.lifted_at.is_(None))
        with self._engine.connect() as conn:
            return [_hold(r) for r in conn.execute(stmt).mappings()]

    def holds_on_study(self, study_uid: str) -> list[LegalHold]:
        """Holds in force covering the study (on it, or on its patient)."""
        with self._engine.connect() as conn:
            patient = conn.execute(select(patients.c.patient_id, patients.c.issuer).join(
                studies, studies.c.patient_pk == patients.c.pk).where(
                studies.c.study_uid == study_uid)).first()
            covers = legal_holds.c.study_uid == study_uid
            if patient is not None:
                covers = or_(covers, legal_holds.c.patient_id == patient.patient_id)
            rows = conn.execute(select(legal_holds).where(
                legal_holds.c.lifted_at.is_(None), covers)
                .order_by(legal_holds.c.placed_at)).mappings().all()
            # A patient's hold placed while the study was theirs follows it when a correction
            # or a merge re-filed it under another patient since.
            followed = held_away(conn.execute(select(legal_holds).where(
                legal_holds.c.lifted_at.is_(None), legal_holds.c.patient_id != "")).all(),
                former_patients(conn, [study_uid])).get(study_uid, [])
        # A patient's hold covers the issuers under which arrivals for its record wait.
        direct = [_hold(r) for r in rows if r["study_uid"] == study_uid or (
            patient is not None and patient.issuer in issuers_standing_for(r["issuer"]))]
        known = {h.public_id for h in direct}
        return direct + [_hold(h._mapping) for h in followed if h.public_id not in known]

    # -- deletion by two administrators --------------------------------------------------

    def request_deletion(self, study_uid: str, actor: Actor, reason: str) -> DeletionRequest:
        """Ask for a study's deletion; another administrator approves it. Refused at once when
        a hold or the study's retention classes would refuse it now."""
        self._require_admin(actor)
        if not reason.strip():
            raise ImageShareError("a deletion request needs a reason")
        retention = self.study_retention(study_uid)
        if not retention.deletable_now:
            raise DeletionRefused(f"this study cannot be deleted: {retention.why_not}")
        with self._engine.begin() as conn:
            patient = conn.execute(select(
                patients.c.patient_id, patients.c.issuer, patients.c.attrs).join(
                studies, studies.c.patient_pk == patients.c.pk).where(
                studies.c.study_uid == study_uid)).first()
            patient_id = str(patient.patient_id or "") if patient else ""
            issuer = issuer_as_sent(str(patient.issuer or ""), patient.attrs) if patient else ""
            if conn.execute(select(deletion_requests.c.pk).where(
                    deletion_requests.c.study_uid == study_uid,
                    deletion_requests.c.state == "pending")).first() is not None:
                raise ImageShareError("a deletion of this study is already waiting for approval")
            public_id = secrets.token_hex(8)
            conn.execute(deletion_requests.insert().values(
                public_id=public_id, study_uid=study_uid, patient_id=patient_id,
                patient_issuer=issuer[:64], reason=reason.strip()[:2000], state="pending",
                requested_by=actor.name[:128], requested_at=self.clock()))
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.request", outcome="success",
                patient_id=patient_id, study_uid=study_uid,
                detail={"request": public_id, "reason": reason.strip()[:200]}), conn=conn)
        return self.deletion_request(public_id)

    def approve_deletion(self, public_id: str, actor: Actor, note: str = "") -> Removed:
        """A second administrator approves: the study's blobs and index rows are deleted
        (audited), unless a hold or a retention class refuses it now."""
        self._require_admin(actor)
        request = self._pending(public_id)
        if request.requested_by == actor.name:
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.approve", outcome="failure",
                patient_id=request.patient_id, study_uid=request.study_uid,
                detail={"request": public_id, "reason": "the requester cannot approve"}))
            raise Forbidden("another administrator than the one who asked must approve")
        # The request is claimed for this approval first: a withdrawal or a refusal in the
        # meantime is refused (it would otherwise be overwritten by a deletion done anyway).
        claim = self._claim_for_approval(public_id, actor)
        try:
            removed = self._deletion.approved_study(
                request.study_uid, actor,
                f"deletion requested by {request.requested_by}, approved by {actor.name}: "
                f"{request.reason}"[:500], request=public_id)
        except DeletionRefused as exc:
            self._release_claim(public_id, claim)
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.approve", outcome="failure",
                patient_id=request.patient_id, study_uid=request.study_uid,
                detail={"request": public_id, "reason": str(exc)[:200]}))
            raise
        except BaseException:
            self._release_claim(public_id, claim)
            raise
        with self._engine.begin() as conn:
            conn.execute(update(deletion_requests).where(
                deletion_requests.c.public_id == public_id,
                deletion_requests.c.decided_by == claim).values(
                state="deleted", decided_by=actor.name[:128], decided_at=self.clock(),
                note=note.strip()[:2000], deleted=removed.instances))
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.approve", outcome="success",
                patient_id=request.patient_id, study_uid=request.study_uid,
                instance_count=removed.instances,
                detail={"request": public_id, "requested_by": request.requested_by}),
                conn=conn)
        return removed

    def refuse_deletion(self, public_id: str, actor: Actor, note: str = "") -> DeletionRequest:
        """Refuse (or, by the requester, withdraw) a pending deletion: nothing is deleted."""
        self._require_admin(actor)
        request = self._pending(public_id)
        state = "withdrawn" if request.requested_by == actor.name else "refused"
        with self._engine.begin() as conn:
            if not conn.execute(update(deletion_requests).where(
                    deletion_requests.c.public_id == public_id,
                    deletion_requests.c.state == "pending", _unclaimed()).values(
                    state=state, decided_by=actor.name[:128], decided_at=self.clock(),
                    note=note.strip()[:2000])).rowcount:
                raise ImageShareError("this request is being approved or was decided already")
            self._audit.record(AuditEvent(
                actor=actor, action="deletion.refuse", outcome="success",
                patient_id=request.patient_id, study_uid=request.study_uid,
                detail={"request": public_id, "state": state}), conn=conn)
        return self.deletion_request(public_id)

    def allow_again(self, public_id: str, actor: Actor, reason: str) -> int:
        """Let the instances the approved deletion ``public_id`` took away be stored again
        (until then they are refused when sent again, IHE IOCM), saying why; audited
        (``deletion.allow_again``). Returns how many were refused until now."""
        self._require_admin(actor)
        request = self.deletion_request(public_id)
        if request.state != "deleted":
            raise ImageShareError("only the images of a study an approved request deleted "
                                  "can be allowed again")
        if not reason.strip():
            raise ImageShareError("say why the deleted images may be stored again")
        return self._deletion.allow_again(request.study_uid, actor, reason,
                                          patient_id=request.patient_id,
                                          issuer=request.patient_issuer)

    def allow_study_again(self, study_uid: str, actor: Actor, reason: str) -> int:
        """:meth:`allow_again` for the newest approved deletion of ``study_uid`` (the study
        is named, not the request); returns how many were refused until now."""
        with self._engine.connect() as conn:
            public_id = conn.execute(select(deletion_requests.c.public_id).where(
                deletion_requests.c.study_uid == study_uid,
                deletion_requests.c.state == "deleted").order_by(
                deletion_requests.c.decided_at.desc(), deletion_requests.c.pk.desc())
                .limit(1)).scalar()
        if public_id is None:
            self._require_admin(actor)
            return 0  # no approved deletion took its images: none is refused
        return self.allow_again(str(public_id), actor, reason)

    def refused_again(self, request: DeletionRequest) -> int:
        """How many instances of the study ``request`` deleted are refused when sent again
        (0 once allowed again, or when the deletion was not approved)."""
        if request.state != "deleted":
            return 0
        with self._engine.connect() as conn:
            return rejected_in(conn, request.study_uid)

    def deletion_request(self, public_id: str) -> DeletionRequest:
        """One deletion request; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(deletion_requests).where(
                deletion_requests.c.public_id == public_id)).mappings().first()
        if row is None:
            raise NotFound("no such deletion request")
        return _request(row)

    def deletion_requests(self, state: str = "") -> list[DeletionRequest]:
        """Deletion requests (of one state, if given), newest first."""
        stmt = select(deletion_requests).order_by(deletion_requests.c.requested_at.desc(),
                                                  deletion_requests.c.pk.desc())
        if state:
            stmt = stmt.where(deletion_requests.c.state == state)
        with self._engine.connect() as conn:
            return [_request(r) for r in conn.execute(stmt).mappings()]

    def _claim_for_approval(self, public_id: str, actor: Actor) -> str:
        """Mark a pending request as being approved by ``actor``; the mark, to release or to
        finish with. ImageShareError when another decision is under way or was made."""
        claim = (APPROVING + actor.name)[:128]
        with self._engine.begin() as conn:
            if not conn.execute(update(deletion_requests).where(
                    deletion_requests.c.public_id == public_id,
                    deletion_requests.c.state == "pending", _unclaimed()).values(
                    decided_by=claim, decided_at=datetime.now(UTC))).rowcount:
                raise ImageShareError("this request is being approved or was decided already")
        return claim

    def _release_claim(self, public_id: str, claim: str) -> None:
        with self._engine.begin() as conn:
            conn.execute(update(deletion_requests).where(
                deletion_requests.c.public_id == public_id,
                deletion_requests.c.state == "pending",
                deletion_requests.c.decided_by == claim).values(decided_by="", decided_at=None))

    def _pending(self, public_id: str) -> DeletionRequest:
        request = self.deletion_request(public_id)
        if request.state != "pending":
            raise ImageShareError(f"this request was decided already ({request.state})")
        return request

    def _require_admin(self, actor: Actor) -> None:
        if actor.role != "admin" or (actor.kind == "user" and not self._is_admin(actor.name)):
            raise Forbidden("only administrators manage legal holds and deletions")

    # -- what a study page shows ---------------------------------------------------------

    def study_retention(self, study_uid: str, record_only: bool = False) -> StudyRetention:
        """The study's retention classes (with counts and earliest deletion), the holds in
        force on it, and whether two administrators could delete it now (and if not, why).
        ``record_only``: only the instances that are part of the record (for the study page,
        which shows nothing of what waits for a person's decision)."""
        with self._engine.connect() as conn:
            stmt = (
                select(instances.c.retention_class, instances.c.received_at,
                       instances.c.class_since, studies.c.study_uid,
                       patients.c.pk.label("patient_pk"), patients.c.patient_id,
                       patients.c.issuer, patients.c.birth_date)
                .join(series, series.c.pk == instances.c.series_pk)
                .join(studies, studies.c.pk == series.c.study_pk)
                .join(patients, patients.c.pk == studies.c.patient_pk)
                .where(studies.c.study_uid == study_uid))
            if record_only:
                stmt = stmt.where(instance_in_record())
            rows = conn.execute(stmt).all()
            if not rows:
                raise NotFound("no such study")
            facts = instance_facts(conn, rows, lock=False)  # a page: deletes nothing
        now = as_utc(self.clock())
        by_class: dict[str, list[datetime | None]] = {}
        for f in facts:
            by_class.setdefault(f.retention_class, []).append(
                earliest_deletion(f, self.periods))
        classes = []
        for cls, moments in sorted(by_class.items()):
            known = [m for m in moments if m is not None]
            latest = max(known) if len(known) == len(moments) else None
            explanation = (class_help(self.periods)[RetentionClass(cls)]
                           if cls in {c.value for c in RetentionClass} else cls)
            classes.append(ClassCount(cls, len(moments), explanation, latest))
        verdicts = [deletion_verdict(f, self.periods, now, "approved") for f in facts]
        refused = [v for v in verdicts if not v.allowed]
        return StudyRetention(classes, self.holds_on_study(study_uid), not refused,
                              refused[0].reason if refused else "")


def _clinical_from(conn: Connection, kind: str, value: str) -> int:
    """How many clinical instances (the patient record) came from the source ``value`` (an
    AE title or account name) or are of the modality ``value``."""
    stmt = select(func.count()).select_from(instances).where(
        instances.c.retention_class == RetentionClass.CLINICAL.value)
    if kind == "source":
        stmt = stmt.where(or_(instances.c.received_from == value,
                              instances.c.received_from.startswith(value + "@",
                                                                   autoescape=True)))
    else:
        stmt = stmt.join(series, series.c.pk == instances.c.series_pk).where(
            series.c.modality == value)
    return int(conn.execute(stmt).scalar() or 0)


def _unclaimed() -> ColumnElement[bool]:
    """A pending request no approval is working on (or one that died: its mark is stale)."""
    return or_(deletion_requests.c.decided_by == "",
               and_(deletion_requests.c.decided_by.startswith(APPROVING, autoescape=True),
                    deletion_requests.c.decided_at < datetime.now(UTC) - APPROVAL_STALE))


def _series_of(study_uid: str) -> Select[tuple[int]]:
    return select(series.c.pk).join(studies, studies.c.pk == series.c.study_pk).where(
        studies.c.study_uid == study_uid)


def _hold(row: object) -> LegalHold:
    r = dict(row)  # type: ignore[call-overload]
    return LegalHold(r["public_id"], r["patient_id"], r["issuer"], r["study_uid"], r["reason"],
                     r["placed_by"], r["placed_at"], r["lifted_by"], r["lifted_at"],
                     r["lift_reason"])


def _request(row: object) -> DeletionRequest:
    r = dict(row)  # type: ignore[call-overload]
    return DeletionRequest(r["public_id"], r["study_uid"], r["patient_id"], r["reason"],
                           r["state"], r["requested_by"], r["requested_at"], r["decided_by"],
                           r["decided_at"], r["note"], r["deleted"],
                           str(r.get("patient_issuer") or ""))


def count_by_class(engine: Engine) -> dict[str, int]:
    """Instances per retention class in the whole archive."""
    with engine.connect() as conn:
        rows = conn.execute(select(instances.c.retention_class, func.count())
                            .group_by(instances.c.retention_class)).all()
    return {cls: n for cls, n in rows}
