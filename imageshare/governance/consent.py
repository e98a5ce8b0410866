"""Consent records: per patient and purpose (identifiable teaching use, research use,
publication), whether the patient agreed, when, how it was given and who recorded it.

Records are never changed: a new decision (a withdrawal, say) is a new row, and the newest
row of a patient and purpose is the one in force. Teaching and research shares of identifiable
images ask :meth:`ConsentBook.require` first and are refused with the reason when consent is
missing, refused or withdrawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from sqlalchemy import Engine, select

from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConsentMissing, ImageShareError, NotFound
from imageshare.domain.retention import Clock, system_clock
from imageshare.retention.facts import former_patients, parse_da
from imageshare.storage.index.schema import consents, patients, studies

PURPOSES = ("teaching", "research", "publication")
DECISIONS = ("granted", "refused", "withdrawn")
SOURCES = ("form", "verbal", "electronic", "other")
PURPOSE_TEXT = {"teaching": "identifiable teaching use", "research": "research use",
                "publication": "publication"}
# No decision recorded here was made before this day (a mistyped year is refused).
_EARLIEST_DAY = date(1900, 1, 1)


@dataclass(frozen=True)
class ConsentRecord:
    """One recorded decision of a patient."""

    purpose: str
    decision: str
    given_on: str
    source: str
    note: str
    recorded_by: str
    recorded_at: datetime
    # The order it was recorded in (not a clock: a clock put back does not reorder records).
    seq: int = 0


@dataclass(frozen=True)
class PatientRef:
    """The patient a study is filed under (Patient ID and issuer)."""

    patient_id: str
    issuer: str
    birth_date: str = ""


class ConsentBook:
    """Records and answers consent decisions; every record and read is audited."""

    def __init__(self, engine: Engine, audit: AuditTrail, clock: Clock = system_clock) -> None:
        self._engine = engine
        self._audit = audit
        self._clock = clock
        # Called when a patient withdraws or refuses a purpose (patient ID, issuer, purpose,
        # who recorded it): what was shared under that consent ends
        # (imageshare.sharing.links.ShareService.end_for_withdrawn_consent).
        self.on_withdrawn: Callable[[str, str, str, Actor], int] = (
            lambda _pid, _issuer, _purpose, _actor: 0)

    def patient_of(self, study_uid: str) -> PatientRef:
        """The patient of a study; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(patients.c.patient_id, patients.c.issuer,
                                      patients.c.birth_date).join(
                studies, studies.c.patient_pk == patients.c.pk).where(
                studies.c.study_uid == study_uid)).first()
        if row is None:
            raise NotFound("no such study")
        return PatientRef(row.patient_id, row.issuer, row.birth_date or "")

    def record_decision(self, study_uid: str, purpose: str, decision: str, given_on: str,
                        source: str, actor: Actor, note: str = "") -> ConsentRecord:
        """Record a decision of the patient of ``study_uid``; refused with the reason when a
        value is not one of the known ones, the date is not a past or present day or is before
        the patient was born, or the study has no hospital number to file it under (a
        decision filed under an empty one would stand for every unidentified patient)."""
        if purpose not in PURPOSES:
            raise ImageShareError(f"consent is recorded for one of: {', '.join(PURPOSES)}")
        if decision not in DECISIONS:
            raise ImageShareError(f"the decision is one of: {', '.join(DECISIONS)}")
        if source not in SOURCES:
            raise ImageShareError(f"the consent was given by one of: {', '.join(SOURCES)}")
        try:
            day = date.fromisoformat(given_on.strip())
        except ValueError as exc:
            raise ImageShareError("give the day of the decision as YYYY-MM-DD") from exc
        now = self._clock()
        if day > now.astimezone(UTC).date():
            raise ImageShareError("the day of the decision cannot be in the future")
        if day < _EARLIEST_DAY:
            raise ImageShareError("the day of the decision cannot be before 1900")
        patient = self.patient_of(study_uid)
        if not patient.patient_id.strip():
            raise ImageShareError("this study has no hospital number: correct the patient's "
                                  "details first, so that the decision is filed under them")
        born = parse_da(patient.birth_date)
        if born is not None and day < born:
            raise ImageShareError("the day of the decision is before the patient's date of "
                                  "birth: check the day, and that this is the patient's study")
        before = self.in_force(study_uid).get(purpose)
        with self._engine.begin() as conn:
            conn.execute(consents.insert().values(
                patient_id=patient.patient_id, issuer=patient.issuer, purpose=purpose,
                decision=decision, given_on=day.isoformat(), source=source,
                note=note.strip()[:2000], recorded_by=actor.name[:128], recorded_at=now))
            self._audit.record(AuditEvent(
                actor=actor, action="consent.record", outcome="success",
                patient_id=patient.patient_id, study_uid=study_uid,
                detail={"purpose": purpose, "decision": decision, "source": source,
                        "given_on": day.isoformat(),
                        "before": (f"{before.decision} on {before.given_on}" if before
                                   else "none recorded")}), conn=conn)
        current = self.in_force(study_uid).get(purpose)
        if current is not None and current.decision != "granted":
            self.on_withdrawn(patient.patient_id, patient.issuer, purpose, actor)
        return ConsentRecord(purpose, decision, day.isoformat(), source, note.strip()[:2000],
                             actor.name[:128], now)

    def history(self, study_uid: str, actor: Actor) -> list[ConsentRecord]:
        """Every decision of the study's patient, newest first (audited as a read)."""
        patient = self.patient_of(study_uid)
        records = self._records(patient)
        self._audit.record(AuditEvent(actor=actor, action="consent.read", outcome="success",
                                      patient_id=patient.patient_id, study_uid=study_uid,
                                      instance_count=len(records)))
        return records

    def in_force(self, study_uid: str) -> dict[str, ConsentRecord | None]:
        """Per purpose, the decision in force for the study's patient (None: none recorded):
        the one made last (its day; of one day, the one recorded last), not the one typed in
        last: an old form filed after a withdrawal does not bring the consent back. A refusal
        or withdrawal recorded while one of the patient's studies was filed under another
        number (before a correction or a merge) still counts, for all their studies; a consent
        given under that other number does not (it may have been another person's)."""
        patient = self.patient_of(study_uid)
        records = list(self._records(patient))
        with self._engine.connect() as conn:
            theirs = list(conn.execute(select(studies.c.study_uid).join(
                patients, patients.c.pk == studies.c.patient_pk).where(
                patients.c.patient_id == patient.patient_id,
                patients.c.issuer == patient.issuer)).scalars()
                ) if patient.patient_id.strip() else []
            former = {(pid, issuer) for moves in former_patients(
                conn, [study_uid, *theirs]).values() for pid, issuer, _left in moves}
        for pid, issuer in sorted(former - {(patient.patient_id, patient.issuer)}):
            records += [r for r in self._records(PatientRef(pid, issuer))
                        if r.decision != "granted"]
        records.sort(key=lambda r: (r.given_on, r.seq), reverse=True)
        return {p: next((r for r in records if r.purpose == p), None) for p in PURPOSES}

    def refusal_of_teaching(self, study_uid: str) -> str:
        """Why the study's patient may not be taught from, even de-identified: their refusal
        or withdrawal of teaching consent in force ("" when none is)."""
        current = self.in_force(study_uid).get("teaching")
        if current is None or current.decision == "granted":
            return ""
        return f"the patient's consent to teaching use was {current.decision} on " \
               f"{current.given_on}"

    def require(self, study_uid: str, purpose: str, actor: Actor) -> None:
        """Refuse (:class:`ConsentMissing`, audited) unless the study's patient granted
        ``purpose`` and has not withdrawn it since."""
        current = self.in_force(study_uid).get(purpose)
        if current is not None and current.decision == "granted":
            return
        what = PURPOSE_TEXT.get(purpose, purpose)
        if current is None:
            reason = f"no consent to {what} is recorded for this patient"
        else:
            reason = (f"the patient's consent to {what} was {current.decision} "
                      f"on {current.given_on}")
        patient = self.patient_of(study_uid)
        self._audit.record(AuditEvent(actor=actor, action="consent.refused", outcome="failure",
                                      patient_id=patient.patient_id, study_uid=study_uid,
                                      detail={"purpose": purpose, "reason": reason}))
        raise ConsentMissing(reason + "; record it on the study page first, or share "
                             "de-identified images")

    def _records(self, patient: PatientRef) -> list[ConsentRecord]:
        if not patient.patient_id.strip():
            return []  # no hospital number: nothing recorded can be this patient's
        with self._engine.connect() as conn:
            rows = conn.execute(select(consents).where(
                consents.c.patient_id == patient.patient_id,
                consents.c.issuer == patient.issuer).order_by(consents.c.pk.desc())
            ).mappings().all()
        return [ConsentRecord(r["purpose"], r["decision"], r["given_on"], r["source"],
                              r["note"], r["recorded_by"], r["recorded_at"], r["pk"])
                for r in rows]
