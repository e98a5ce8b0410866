"""One study as a person sees it: patient banner, series, devices, documents, who viewed it."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine, select

from imageshare.access.scope import Scope
from imageshare.archive.dicom_json import all_text, nhs_number_of
from imageshare.archive.record import instance_in_record, study_in_record
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import NotFound
from imageshare.storage.index.schema import (
    audit_events,
    instances,
    patients,
    series,
    studies,
)

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Attachment series are made by ImageShare with this description, so they show as documents.
ATTACHMENT_SERIES = "Attached documents"
DOCUMENT_CLASSES = {ENCAPSULATED_PDF, "1.2.840.10008.5.1.4.1.1.104.2",
                    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.22",
                    "1.2.840.10008.5.1.4.1.1.88.33"}
DEVICE_KEYS = {
    "Manufacturer": "00080070", "Model": "00081090", "Station": "00081010",
    "Serial number": "00181000", "Software": "00181020", "Operator": "00081070",
    "Institution": "00080080", "Department": "00081040",
}
VIEW_ACTIONS = ("study.view", "study.retrieve", "study.metadata", "study.render",
                "study.download", "study.frames")


@dataclass(frozen=True)
class PatientRecord:
    """The patient a study is filed under."""

    pk: int
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    sex: str
    nhs_number: str


@dataclass(frozen=True)
class InstanceSummary:
    """One instance of a series."""

    sop_uid: str
    sop_class_uid: str
    number: int | None
    frames: int
    rows: int | None
    columns: int | None


@dataclass(frozen=True)
class SeriesSummary:
    """One series with its device details and instances (in instance-number order)."""

    series_uid: str
    modality: str
    number: int | None
    description: str
    device: dict[str, str]
    instances: list[InstanceSummary]

    @property
    def is_documents(self) -> bool:
        """True for series of reports and attached documents rather than images."""
        return self.description == ATTACHMENT_SERIES or all(
            i.sop_class_uid in DOCUMENT_CLASSES for i in self.instances)

    @property
    def frame_count(self) -> int:
        """Frames over all instances (what the viewer scrolls through)."""
        return sum(i.frames for i in self.instances)


@dataclass(frozen=True)
class StudyRecord:
    """A study, its patient and its series."""

    study_uid: str
    patient: PatientRecord
    study_date: str
    study_time: str
    accession: str
    study_id: str
    description: str
    referring: str
    modalities: str
    series: list[SeriesSummary]
    attrs: dict[str, Any]


class StudyCatalogue:
    """Reads studies for pages; every look is audited."""

    def __init__(self, engine: Engine, audit: AuditTrail) -> None:
        self._engine = engine
        self._audit = audit

    def in_record(self, study_uid: str) -> bool:
        """Whether the study exists and is part of the patient record (not only waiting in
        the inbox or for review)."""
        with self._engine.connect() as conn:
            return conn.execute(select(studies.c.pk).where(
                studies.c.study_uid == study_uid, study_in_record())).first() is not None

    def record(self, study_uid: str, include_review: bool = True) -> StudyRecord:
        """The study as indexed, not audited (for services that audit their own work); with
        ``include_review`` false only what is part of the record (NotFound when nothing is)."""
        with self._engine.connect() as conn:
            row = conn.execute(
                select(studies, patients.c.pk.label("p_pk"), patients.c.patient_id,
                       patients.c.issuer, patients.c.name, patients.c.birth_date,
                       patients.c.sex, patients.c.attrs.label("p_attrs"))
                .join(patients, patients.c.pk == studies.c.patient_pk)
                .where(studies.c.study_uid == study_uid)
            ).mappings().first()
            if row is None:
                raise NotFound("no such study")
            series_rows = conn.execute(
                select(series).where(series.c.study_pk == row["pk"])
                .order_by(series.c.series_number, series.c.pk)
            ).mappings().all()
            instance_rows = conn.execute(
                select(instances.c.series_pk, instances.c.sop_uid, instances.c.sop_class_uid,
                       instances.c.instance_number, instances.c.number_of_frames,
                       instances.c.rows, instances.c.columns)
                .where(instances.c.series_pk.in_([s["pk"] for s in series_rows]),
                       *(() if include_review else (instance_in_record(),)))
                .order_by(instances.c.instance_number, instances.c.pk)
            ).all()
        if not include_review:
            present = {r.series_pk for r in instance_rows}
            series_rows = [s for s in series_rows if s["pk"] in present]
            if not series_rows:
                raise NotFound("no such study")
        by_series: dict[int, list[InstanceSummary]] = {}
        for r in instance_rows:
            by_series.setdefault(r.series_pk, []).append(InstanceSummary(
                r.sop_uid, r.sop_class_uid, r.instance_number, r.number_of_frames or 1,
                r.rows, r.columns))
        patient_attrs = row["p_attrs"] or {}
        patient = PatientRecord(
            row["p_pk"], row["patient_id"], row["issuer"], row["name"], row["birth_date"],
            row["sex"], nhs_number_of(patient_attrs))
        return StudyRecord(
            study_uid=study_uid, patient=patient, study_date=row["study_date"],
            study_time=row["study_time"], accession=row["accession_number"],
            study_id=row["study_id"], description=row["description"],
            referring=row["referring_name"],
            modalities="\\".join(sorted({s["modality"] for s in series_rows if s["modality"]})),
            series=[
                SeriesSummary(
                    s["series_uid"], s["modality"], s["series_number"], s["description"],
                    {label: all_text((s["attrs"] or {}).get(tag))
                     for label, tag in DEVICE_KEYS.items()
                     if all_text((s["attrs"] or {}).get(tag))},
                    by_series.get(s["pk"], []),
                )
                for s in series_rows
            ],
            attrs={**patient_attrs, **(row["attrs"] or {})},
        )

    def view(self, study_uid: str, actor: Actor, allowed_studies: Collection[str] | None,
             include_review: bool = False) -> StudyRecord:
        """The study for ``actor``'s eyes, audited as ``study.view``; NotFound when it does
        not exist, is outside ``allowed_studies`` or is not part of the record (still in the
        inbox; ``include_review`` is for the inbox's own pages). A :class:`Scope` keeps only
        the series and instances it grants."""
        try:
            if allowed_studies is not None and study_uid not in allowed_studies:
                raise NotFound("no such study")
            study = self.record(study_uid, include_review)
            if isinstance(allowed_studies, Scope):
                study = _within(study, allowed_studies)
        except NotFound:
            self._audit.record(AuditEvent(actor=actor, action="study.view", outcome="failure",
                                          study_uid=study_uid, detail={"reason": "not found"}))
            raise
        self._audit.record(AuditEvent(
            actor=actor, action="study.view", outcome="success",
            patient_id=study.patient.patient_id, study_uid=study_uid,
            instance_count=sum(len(s.instances) for s in study.series)))
        return study

    def viewers(self, study_uid: str, actor: Actor, limit: int = 50) -> list[dict[str, Any]]:
        """Who looked at the study and when (newest first); reading this is audited too."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(audit_events.c.at, audit_events.c.actor, audit_events.c.action,
                       audit_events.c.source, audit_events.c.outcome)
                .where(audit_events.c.study_uid == study_uid)
                .where(audit_events.c.action.in_(VIEW_ACTIONS))
                .order_by(audit_events.c.pk.desc()).limit(limit)
            ).mappings().all()
        self._audit.record(AuditEvent(actor=actor, action="audit.read", outcome="success",
                                      study_uid=study_uid, instance_count=len(rows)))
        return [dict(r) for r in rows]


def _within(study: StudyRecord, scope: Scope) -> StudyRecord:
    """The study with only the series and instances ``scope`` reaches."""
    kept = []
    for s in study.series:
        members = [i for i in s.instances
                   if scope.covers(study.study_uid, s.series_uid, i.sop_uid)]
        if members:
            kept.append(replace(s, instances=members))
    if not kept:
        raise NotFound("no such study")
    modalities = "\\".join(sorted({s.modality for s in kept if s.modality}))
    return replace(study, series=kept, modalities=modalities)
