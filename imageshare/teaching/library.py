"""The teaching library: de-identified teaching cases with history, findings, diagnosis,
differential, keywords, modality, body part and difficulty; non-DICOM attachments (PDF,
photos, video, office documents); filed in folders and collections (a conference, a course);
found by keyword, diagnosis, modality and body part.

A teaching case never points at the patient's record: when it is made, the chosen images are
copied through the de-identification profile ``teaching`` (the same engine and independent
verifier as every export; an image that may still show the patient is held back) and the copy
is stored as a study of its own, under pseudonymous identifiers. Marks drawn on the images go
with them (their presentation states are copied through the profile, the viewer's marks are
moved to the copy's UIDs). Whoever may manage cases sees the library; only the case's author
changes it.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sqlalchemy import Engine, and_, delete, insert, or_, select, update

from imageshare.archive.ingest import IngestService
from imageshare.archive.retrieve import RetrieveService, StoredInstance
from imageshare.audit.trail import PATIENT_ISSUER, AuditEvent, AuditTrail
from imageshare.deid.identity import field_naming_the_patient
from imageshare.deid.service import Deidentifier, seekable
from imageshare.domain.actors import Actor
from imageshare.domain.errors import Forbidden, ImageShareError, NotFound
from imageshare.storage.blobs import BlobStore, new_blob_key
from imageshare.storage.index.database import from_row
from imageshare.storage.index.schema import annotations as marks_table
from imageshare.storage.index.schema import (
    case_attachments,
    case_items,
    cases,
    instances,
    series,
    studies,
)
from imageshare.teaching.files import (
    FileType,
    document_without_metadata,
    sniff,
    video_without_metadata,
    without_metadata,
)

if TYPE_CHECKING:
    from pydicom import Dataset

PROFILE = "teaching"
DIFFICULTIES = ("", "beginner", "intermediate", "advanced")
TEXT_FIELDS = ("history", "findings", "diagnosis", "differential", "keywords")
# The most characters each field of a case holds.
FIELD_LIMITS = {"title": 128, **dict.fromkeys(TEXT_FIELDS, 10_000), "modality": 16,
                "body_part": 64, "folder": 128, "collection": 128, "description": 10_000}


@dataclass(frozen=True)
class TeachingCase:
    """A teaching case as stored."""

    pk: int
    public_id: str
    owner: str
    title: str
    description: str
    folder: str
    collection: str
    history: str
    findings: str
    diagnosis: str
    differential: str
    keywords: str
    modality: str
    body_part: str
    difficulty: str
    created_at: datetime
    updated_at: datetime

    @property
    def path(self) -> str:
        """The case's stable address in the web app (no patient data in it)."""
        return f"/teaching/{self.public_id}"


@dataclass(frozen=True)
class CaseFields:
    """What an educator writes about a case."""

    title: str
    history: str = ""
    findings: str = ""
    diagnosis: str = ""
    differential: str = ""
    keywords: str = ""
    modality: str = ""
    body_part: str = ""
    difficulty: str = ""
    folder: str = ""
    collection: str = ""
    description: str = ""

    def values(self) -> dict[str, str]:
        """Checked, trimmed column values; ImageShareError for what cannot be kept (a text
        longer than its field holds is refused, naming the field, never cut short)."""
        if not self.title.strip():
            raise ImageShareError("a teaching case needs a title")
        if self.difficulty not in DIFFICULTIES:
            raise ImageShareError("difficulty is beginner, intermediate or advanced")
        out = {name: getattr(self, name).strip() for name in FIELD_LIMITS}
        for name, limit in FIELD_LIMITS.items():
            if len(out[name]) > limit:
                raise ImageShareError(
                    f"the {name.replace('_', ' ')} may have at most {limit:,} characters "
                    f"(this has {len(out[name]):,}); nothing was saved")
        out.update(modality=out["modality"].upper(), body_part=out["body_part"].upper(),
                   difficulty=self.difficulty)
        return out


@dataclass(frozen=True)
class Attachment:
    """A non-DICOM file of a case."""

    public_id: str
    title: str
    media_type: str
    kind: str
    size: int
    blob_key: str
    created_at: datetime


@dataclass(frozen=True)
class CopiedImages:
    """The outcome of copying a study into a case: the copy's study UID (empty when every
    image was held back), how many images were copied and held back."""

    study_uid: str
    copied: int
    held_back: int


# A photo is read whole to be kept without its metadata (EXIF, GPS, text).
MAX_PHOTO_BYTES = 64 << 20


class TeachingLibrary:
    """Makes teaching cases from de-identified copies, keeps their attachments, finds them."""

    def __init__(self, engine: Engine, retrieve: RetrieveService, ingest: IngestService,
                 deidentifier: Callable[[str], Deidentifier], blobs: BlobStore,
                 audit: AuditTrail, max_attachment_bytes: int) -> None:
        self._engine = engine
        self._retrieve = retrieve
        self._ingest = ingest
        self._deidentifier = deidentifier
        self._blobs = blobs
        self._audit = audit
        self.max_attachment_bytes = max_attachment_bytes
        # Why the patient of a study may not be taught from ("" when they may): a refusal or
        # withdrawal of teaching consent on record (imageshare.governance.consent).
        self.teaching_refused: Callable[[str], str] = lambda _study_uid: ""

    def _authorise_teaching_use(self, actor: Actor, found: Collection[StoredInstance]
                                ) -> None:
        """The one place that decides whether these images may become teaching material
        (beyond the route's permission to see them): not when their patient refused or
        withdrew consent to teaching use, even de-identified (audited, Forbidden)."""
        for study_uid in sorted({inst.study_uid for inst in found}):
            reason = self.teaching_refused(study_uid)
            if reason:
                self._audit.record(AuditEvent(
                    actor=actor, action="consent.refused", outcome="failure",
                    patient_id=next(i.patient_id for i in found if i.study_uid == study_uid),
                    study_uid=study_uid, detail={"purpose": "teaching", "reason": reason}))
                raise Forbidden(f"{reason}: no teaching case is made from these images")

    # -- cases ------------------------------------------------------------------------------

    def create(self, actor: Actor, fields: CaseFields, study_uid: str,
               series_uids: Collection[str] = (),
               allowed_studies: Collection[str] | None = None) -> TeachingCase:
        """A new teaching case holding a de-identified, verified copy of the study (or of the
        chosen series); ImageShareError when nothing could be copied."""
        values = fields.values()
        found = self._retrieve.select(actor, "teaching.create", study_uids=[study_uid],
                                      series_uids=list(series_uids),
                                      allowed_studies=allowed_studies, audit=False)
        self._authorise_teaching_use(actor, found)
        headers = self._retrieve.patients_headers(found)
        self._refuse_words_naming_the_patient(headers, values)
        public_id = secrets.token_hex(8)
        copied = self._copy(actor, found, public_id, headers)
        if not copied.copied:
            raise ImageShareError("no image of the study could be de-identified safely (all "
                                  "were held back); nothing was made")
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            pk = conn.execute(insert(cases).values(  # type: ignore[index]  # an INSERT has a key
                public_id=public_id, owner=actor.name, kind="teaching", created_at=now,
                updated_at=now, **values)).inserted_primary_key[0]
            conn.execute(insert(case_items).values(case_pk=pk, study_uid=copied.study_uid,
                                                   series_uid="", sop_uid=""))
        return self.get(public_id)

    @staticmethod
    def _refuse_words_naming_the_patient(headers: list[Dataset], values: dict[str, str],
                                         outcome: str = "nothing was made") -> None:
        """ImageShareError (naming the field, never the identifier) when what the educator
        wrote names the patient of the images (``headers``: one per patient): a teaching case
        is de-identified."""
        texts = {name: text for name, text in values.items()
                 if name not in ("modality", "difficulty")}
        name = field_naming_the_patient(headers, texts)
        if name:
            raise ImageShareError(
                f"the {name.replace('_', ' ')} names the patient (a name, an identifier or the "
                f"birth date); a teaching case is de-identified: reword it; {outcome}")

    def source_studies(self, case: TeachingCase) -> list[str]:
        """The studies (of the patients' records) the case's copies were made from. The case
        does not point at them; the audit trail's ``teaching.create`` events of the case
        name them, and they are read only to protect the patient (their words kept out of
        the case, their consent decisions followed)."""
        return list(dict.fromkeys(study for study, _patient, _issuer in self._sources(case)))

    def _sources(self, case: TeachingCase) -> list[tuple[str, str, str]]:
        """The studies the case's copies were made from, each with its patient as the
        ``teaching.create`` events of the case name them (study UID, patient ID, issuer),
        oldest first."""
        found = list(self._audit.events("teaching.create", detail=("case", case.public_id)))
        sources: dict[str, tuple[str, str, str]] = {}
        for e in reversed(found):  # oldest first: the first of each study is its making
            if e.get("study_uid"):
                sources.setdefault(str(e["study_uid"]), (
                    str(e["study_uid"]), str(e.get("patient_id") or ""),
                    str(e["detail"].get(PATIENT_ISSUER) or "")))
        return list(sources.values())

    def held_back(self, case: TeachingCase) -> int:
        """How many images of the studies the case was made from were held back (not
        copied into it) because they might still show the patient."""
        return sum(int(e["detail"].get("held_back", 0) or 0) for e in self._audit.events(
            "teaching.create", detail=("case", case.public_id)) if e["outcome"] == "success")

    def _source_headers(self, case: TeachingCase) -> list[Dataset]:
        """One stored header per source study of the case that is still in the archive."""
        sources = self.source_studies(case)
        if not sources:
            return []
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(studies.c.study_uid, instances.c.sop_uid)
                .join(series, series.c.study_pk == studies.c.pk)
                .join(instances, instances.c.series_pk == series.c.pk)
                .where(studies.c.study_uid.in_(sources))).all()
        first: dict[str, str] = {}
        for study_uid, sop_uid in rows:
            first.setdefault(study_uid, sop_uid)
        return [h for h in (self._retrieve.header(uid) for uid in first.values())
                if h is not None]

    def copies_from(self, study_uids: Collection[str]) -> list[str]:
        """The de-identified copies (study UIDs) held by teaching cases made from any of
        ``study_uids`` (a patient's studies): what must stop being shared when that patient
        withdraws teaching consent."""
        made: dict[str, None] = {}
        for study_uid in dict.fromkeys(study_uids):
            for found in self._audit.events("teaching.create", study_uid=study_uid):
                made.setdefault(str(found["detail"].get("case", "")), None)
        copies: list[str] = []
        for public_id in made:
            try:
                copies += self.studies(self.get(public_id))
            except NotFound:  # deleted since
                continue
        return list(dict.fromkeys(copies))

    def withdrawn(self, case: TeachingCase) -> str:
        """Why the case may no longer be shown ("" when it may): the patient of a study it
        was made from refused or withdrew teaching consent after it was made."""
        return self._withdrawn_by(case)[1]

    def _withdrawn_by(self, case: TeachingCase) -> tuple[tuple[str, str, str] | None, str]:
        """The source (as :meth:`_sources` gives it) whose patient refused or withdrew
        teaching consent, and why; (None, "") when the case may be shown."""
        for source in self._sources(case):
            try:
                reason = self.teaching_refused(source[0])
            except NotFound:  # the source study was deleted: no decision can be read
                continue
            if reason:
                return source, reason
        return None, ""

    def require_usable(self, case: TeachingCase, actor: Actor) -> None:
        """Forbidden (audited as a consent refusal) when the case may no longer be shown,
        presented, opened or shared (:meth:`withdrawn`); its author may still delete it."""
        source, reason = self._withdrawn_by(case)
        if source is not None:
            # Whose decision refused it: the patient and the study the case was made from.
            self._audit.record(AuditEvent(
                actor=actor, action="consent.refused", outcome="failure",
                patient_id=source[1], study_uid=source[0], issuer=source[2],
                detail={"purpose": "teaching", "reason": reason, "case": case.public_id}))
            raise Forbidden(f"{reason}: this teaching case is no longer shown")

    def _copy(self, actor: Actor, found: list[StoredInstance], public_id: str,
              headers: list[Dataset]) -> CopiedImages:
        """Copy each instance through the teaching profile into the archive, and the viewer's
        marks with them (not those whose words name the patient of ``headers``); audited as
        one event."""
        deidentifier = self._deidentifier(PROFILE)
        mapping: dict[str, str] = {}
        copy_study = ""
        held_back = 0
        try:
            for inst in found:
                out = io.BytesIO()
                with self._retrieve.open(inst) as fp, seekable(fp) as source:
                    outcome = deidentifier.write(source, out)
                if outcome.held_back or outcome.dataset is None:
                    held_back += 1
                    continue
                out.seek(0)
                stored = self._ingest.store_stream(out, actor)
                mapping[inst.sop_uid] = stored.sop_instance_uid
                copy_study = copy_study or stored.study_uid
        except Exception:
            # Copies stored before the failure stay in the archive: their making (the
            # patient's images read and copied) is recorded, as a failure, before raising.
            if mapping:
                self._audit.record(AuditEvent(
                    actor=actor, action="teaching.create", outcome="failure",
                    patient_id=found[0].patient_id, study_uid=found[0].study_uid,
                    instance_count=len(mapping),
                    detail={"case": public_id, "profile": PROFILE, "copied": len(mapping),
                            "held_back": held_back}))
            raise
        with self._engine.begin() as conn:
            if mapping:
                self._copy_marks(conn, mapping, copy_study, headers)
            self._audit.record(AuditEvent(
                actor=actor, action="teaching.create", outcome="success",
                patient_id=found[0].patient_id, study_uid=found[0].study_uid,
                instance_count=len(found),
                detail={"case": public_id, "profile": PROFILE, "copied": len(mapping),
                        "held_back": held_back}), conn=conn)
        return CopiedImages(copy_study, len(mapping), held_back)

    def _copy_marks(self, conn: Any, mapping: dict[str, str], copy_study: str,
                    headers: list[Dataset]) -> None:
        """The viewer's marks on the originals, kept on the copies (the coordinates are the
        same pixels; author labels are user names, never patient data). A frame's marks whose
        typed words (a label, a text mark) name the patient are not carried: a teaching case
        is de-identified."""
        rows = conn.execute(select(marks_table).where(
            marks_table.c.sop_uid.in_(list(mapping)))).mappings().all()
        for row in rows:
            words = {f"mark {n}": str(m.get("label") or "") for n, m in enumerate(row["marks"])
                     if isinstance(m, dict)}
            if field_naming_the_patient(headers, words):
                continue
            conn.execute(delete(marks_table).where(
                marks_table.c.sop_uid == mapping[row["sop_uid"]],
                marks_table.c.frame == row["frame"], marks_table.c.author == row["author"]))
            conn.execute(insert(marks_table).values(
                study_uid=copy_study, sop_uid=mapping[row["sop_uid"]], frame=row["frame"],
                author=row["author"], author_label=row["author_label"], marks=row["marks"],
                created_at=row["created_at"]))

    def get(self, public_id: str) -> TeachingCase:
        """A teaching case by its public id; NotFound otherwise."""
        with self._engine.connect() as conn:
            row = conn.execute(select(cases).where(cases.c.public_id == public_id,
                                                   cases.c.kind == "teaching")
                               ).mappings().first()
        if row is None:
            raise NotFound("no such teaching case")
        return from_row(TeachingCase, row)

    def studies(self, case: TeachingCase) -> list[str]:
        """The de-identified copies' study UIDs the case shows, in order."""
        with self._engine.connect() as conn:
            return list(dict.fromkeys(conn.execute(
                select(case_items.c.study_uid).where(case_items.c.case_pk == case.pk)
                .order_by(case_items.c.pk)).scalars()))

    def marks(self, case: TeachingCase, study_uid: str,
              viewer: str = "") -> dict[str, list[dict[str, Any]]]:
        """The marks on one of the case's copies that belong to the case, keyed ``SOP|frame``
        (as the viewer takes them): those carried from the originals when it was made and
        its author's; with ``viewer``, that user's own too (to see and change them). Marks
        other staff drew on the copy later do not show in the author's presentation."""
        made = _utc(case.created_at)
        with self._engine.connect() as conn:
            rows = conn.execute(select(marks_table).where(
                marks_table.c.study_uid == study_uid).order_by(marks_table.c.pk)
            ).mappings().all()
        out: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if (row["author"] not in (case.owner, viewer or case.owner)
                    and _utc(row["created_at"]) > made):
                continue
            label = row["author_label"] or row["author"]
            out.setdefault(f"{row['sop_uid']}|{row['frame']}", []).extend(
                {**m, "author": label} for m in row["marks"])
        return out

    def add_study(self, case: TeachingCase, actor: Actor, study_uid: str,
                  allowed_studies: Collection[str] | None = None) -> CopiedImages:
        """Copy another study (de-identified, verified) into the author's case."""
        self._require_author(case, actor, "case.add")
        found = self._retrieve.select(actor, "teaching.create", study_uids=[study_uid],
                                      allowed_studies=allowed_studies, audit=False)
        self._authorise_teaching_use(actor, found)
        headers = self._retrieve.patients_headers(found)
        self._refuse_words_naming_the_patient(
            headers, {name: getattr(case, name) for name in FIELD_LIMITS}, "nothing was added")
        copied = self._copy(actor, found, case.public_id, headers)
        if copied.copied:
            with self._engine.begin() as conn:
                exists = conn.execute(select(case_items.c.pk).where(
                    case_items.c.case_pk == case.pk,
                    case_items.c.study_uid == copied.study_uid)).first()
                if exists is None:
                    conn.execute(insert(case_items).values(
                        case_pk=case.pk, study_uid=copied.study_uid, series_uid="",
                        sop_uid=""))
        return copied

    def update(self, case: TeachingCase, actor: Actor, fields: CaseFields,
               version: datetime | None = None) -> None:
        """Change what the case says (its author only), never to words naming the patient
        of its images. ``version``: when the case was last changed as the editor saw it; a
        case changed since (another tab, another device) is not overwritten (refused with
        the reason, nothing saved)."""
        self._require_author(case, actor, "case.update")
        values = fields.values()
        self._refuse_words_naming_the_patient(self._source_headers(case), values,
                                              "nothing was saved")
        with self._engine.begin() as conn:
            stored = conn.execute(select(cases.c.updated_at).where(
                cases.c.pk == case.pk)).scalar()
            if stored is None:
                raise NotFound("no such teaching case")
            if version is not None and _utc(stored) != _utc(version):
                raise ImageShareError("the case was changed since this page was opened (in another "
                               "tab or by another device): open it again and redo the "
                               "change; nothing was saved")
            changed = conn.execute(update(cases).where(
                cases.c.pk == case.pk, cases.c.updated_at == stored).values(
                updated_at=datetime.now(UTC), **values))
            if changed.rowcount != 1:
                raise ImageShareError("the case was changed at the same moment: open it again and "
                               "redo the change; nothing was saved")
            self._audit.record(AuditEvent(
                actor=actor, action="case.update", outcome="success",
                detail={"case": case.public_id, "fields": sorted(values)}), conn=conn)

    def _require_author(self, case: TeachingCase, actor: Actor, wanted: str) -> None:
        """Raise Forbidden (audited as a refusal naming ``wanted``) unless ``actor`` wrote
        the case."""
        if actor.kind != "user" or actor.name != case.owner:
            self._audit.record(AuditEvent(
                actor=actor, action="access.denied", outcome="refused",
                detail={"wanted": wanted, "reason": "not the teaching case's author",
                        "route": case.path}))
            raise Forbidden("only the case's author changes it")

    def search(self, text: str = "", modality: str = "", body_part: str = "",
               diagnosis: str = "", collection: str = "",
               limit: int = 200, offset: int = 0) -> list[TeachingCase]:
        """Teaching cases matching every given criterion (words of ``text`` in the title,
        keywords, diagnosis, differential, findings or history; the others compared without
        regard to case), by collection, folder, title then age (a total order, so that pages
        of ``limit`` cases from ``offset`` neither repeat nor skip one). The words are bound
        as values (LIKE patterns with their wildcards escaped), never built into the query's
        text."""
        stmt = select(cases).where(cases.c.kind == "teaching")
        for word in text.split()[:8]:
            pattern = f"%{_escape(word.lower()[:64])}%"
            stmt = stmt.where(or_(*(
                _lower(cases.c[name]).like(pattern, escape="\\")
                for name in ("title", "keywords", "diagnosis", "differential", "findings",
                             "history"))))
        if modality.strip():
            stmt = stmt.where(_lower(cases.c.modality) == modality.strip().lower()[:16])
        if body_part.strip():
            stmt = stmt.where(_lower(cases.c.body_part) == body_part.strip().lower()[:64])
        if diagnosis.strip():
            stmt = stmt.where(_lower(cases.c.diagnosis).like(
                f"%{_escape(diagnosis.strip().lower()[:128])}%", escape="\\"))
        if collection.strip():
            stmt = stmt.where(and_(cases.c.collection == collection.strip()[:128]))
        stmt = (stmt.order_by(cases.c.collection, cases.c.folder, cases.c.title, cases.c.pk)
                .limit(max(1, min(limit, 1000))).offset(max(0, offset)))
        with self._engine.connect() as conn:
            return [from_row(TeachingCase, r) for r in conn.execute(stmt).mappings()]

    def collections(self) -> list[str]:
        """The collections (conference, course ...) teaching cases are filed in."""
        with self._engine.connect() as conn:
            return sorted(c for c in conn.execute(
                select(cases.c.collection).where(cases.c.kind == "teaching").distinct()
            ).scalars() if c)

    def record_view(self, case: TeachingCase, actor: Actor, format: str = "page") -> None:  # noqa: A002
        """Audit that the case was shown (its page, or presented); Forbidden (audited as a
        refusal) once the patient of its images withdrew teaching consent."""
        self.require_usable(case, actor)
        self._audit.record(AuditEvent(actor=actor, action="case.view", outcome="success",
                                      detail={"case": case.public_id, "format": format}))

    def delete(self, case: TeachingCase, actor: Actor) -> None:
        """Delete the case and its attachments (its de-identified copies stay in the
        archive, where retention governs them)."""
        self._require_author(case, actor, "case.delete")
        keys = [a.blob_key for a in self.attachments(case)]
        copies = self.studies(case)
        detail = {"case": case.public_id, "copies": copies, "attachments": len(keys)}
        # One event per study the case was made from, naming it and its patient (whose
        # access report lists the deletion); one naming only the case when none is known.
        events = [AuditEvent(actor=actor, action="case.delete", outcome="success",
                             patient_id=patient, study_uid=study, issuer=issuer,
                             detail=detail)
                  for study, patient, issuer in self._sources(case)] or [
            AuditEvent(actor=actor, action="case.delete", outcome="success", detail=detail)]
        with self._engine.begin() as conn:
            conn.execute(delete(cases).where(cases.c.pk == case.pk))
            self._audit.record(events, conn=conn)
        for key in keys:
            try:
                self._blobs.delete(key)
            except (KeyError, OSError):  # already gone: nothing to keep
                pass

    # -- attachments ------------------------------------------------------------------------

    def attach(self, case: TeachingCase, actor: Actor, content: BinaryIO, size: int,
               title: str, scratch_dir: Path | None = None) -> Attachment:
        """Keep a file with the case (type sniffed from its content; too large or unknown
        files are refused and nothing is kept). A teaching case is de-identified, so what a
        photo or video says besides its picture (EXIF, GPS, text chunks, a phone video's
        place and device) is not kept (:func:`~imageshare.teaching.files.without_metadata`),
        nor what a PDF or office document says about who made it
        (:func:`~imageshare.teaching.files.document_without_metadata`);
        ``scratch_dir``: where a video is written again without it."""
        self._require_author(case, actor, "case.attach")
        self._refuse_words_naming_the_patient(self._source_headers(case),
                                              {"file's title": title},
                                              "nothing was attached")
        if size > self.max_attachment_bytes:
            raise ImageShareError(f"an attachment may be at most "
                                  f"{self.max_attachment_bytes // (1 << 20)} MB")
        if size == 0:
            raise ImageShareError("the file is empty")
        content.seek(0)
        head = content.read(1 << 20 if size > (1 << 20) else size)
        kind = _sniff_whole(content, head, size)
        content.seek(0)
        with contextlib.ExitStack() as cleanup:
            if kind.kind == "image":
                if size > MAX_PHOTO_BYTES:  # read whole to leave its metadata out
                    raise ImageShareError(f"photos may be at most {MAX_PHOTO_BYTES >> 20} MB")
                data = without_metadata(content.read(size), kind)
                content, size = io.BytesIO(data), len(data)
            elif kind.kind in ("pdf", "document", "video"):
                clean = (video_without_metadata if kind.kind == "video"
                         else document_without_metadata)
                cleaned = cleanup.enter_context(tempfile.TemporaryFile(dir=scratch_dir))
                if clean(content, cleaned, kind):
                    size = cleaned.seek(0, os.SEEK_END)
                    cleaned.seek(0)
                    content = cleaned
                else:
                    content.seek(0)
            key = new_blob_key()
            self._blobs.put(key, content, size)
        public_id = secrets.token_hex(8)
        now = datetime.now(UTC)
        with self._engine.begin() as conn:
            conn.execute(insert(case_attachments).values(
                case_pk=case.pk, public_id=public_id,
                title=(title.strip() or f"{kind.kind.capitalize()} attachment")[:128],
                media_type=kind.media_type, kind=kind.kind, size=size, blob_key=key,
                created_at=now))
            self._audit.record(AuditEvent(actor=actor, action="case.attach", outcome="success",
                                          detail={"case": case.public_id, "kind": kind.kind}),
                               conn=conn)
        return self.attachment(case, public_id)

    def attachments(self, case: TeachingCase) -> list[Attachment]:
        """The case's files, in the order they were attached."""
        with self._engine.connect() as conn:
            rows = conn.execute(select(case_attachments).where(
                case_attachments.c.case_pk == case.pk).order_by(case_attachments.c.pk)
            ).mappings().all()
        return [from_row(Attachment, r) for r in rows]

    def attachment(self, case: TeachingCase, public_id: str) -> Attachment:
        """One of the case's files; NotFound otherwise."""
        for found in self.attachments(case):
            if found.public_id == public_id:
                return found
        raise NotFound("no such attachment")

    def open_attachment(self, case: TeachingCase, attachment: Attachment,
                        actor: Actor) -> BinaryIO:
        """The file's bytes (audited); Forbidden once the patient withdrew teaching
        consent."""
        self.require_usable(case, actor)
        self._audit.record(AuditEvent(actor=actor, action="case.attachment", outcome="success",
                                      detail={"case": case.public_id,
                                              "kind": attachment.kind}))
        return self._blobs.open(attachment.blob_key)


def _sniff_whole(content: BinaryIO, head: bytes, size: int) -> FileType:
    """The type of the file: from its start, or (for ZIP packages, whose directory is at the
    end) from the whole file when it is small enough to open as a package."""
    if head.startswith(b"PK\x03\x04") and size > len(head):
        if size > 64 << 20:
            raise ImageShareError("office documents may be at most 64 MB")
        content.seek(0)
        return sniff(content.read(size))
    return sniff(head)


def _utc(moment: datetime) -> datetime:
    """``moment`` with its time zone (SQLite gives naive UTC values back)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _escape(text: str) -> str:
    """``text`` for a LIKE pattern with its wildcards taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _lower(column: Any) -> Any:
    from sqlalchemy import func

    return func.lower(column)
