"""Everything a round of an upload holds becomes DICOM through the one ingest pipeline, into the
``upload`` review class (kept out of search, QIDO-RS, C-FIND and C-MOVE until accepted).

The round's folder is walked like media given to ``imageshare import`` (the same walker: a
folder with a DICOMDIR is read through its references, each opened inside the folder without
following symbolic links; every zip file it opens, whatever its name or first bytes, passes
the bomb limits first, and what zip files expand to counts against the invitation's size
limit). DICOM files are stored as they are, their patient checked against the invitation
(a mismatch is flagged and held for review, never merged). Photos, videos and PDFs are made
DICOM with the invitation's identity (:mod:`imageshare.uploads.convert`; what a photo grows
by beyond a few times its file counts against that limit too); the original file is kept
beside it in the originals store, its SHA-256 recorded.

A round reads at most as many items as an upload may hold files (``MAX_FILES``: files, the
files a CD's DICOMDIR lists and the members of zip files all count); what is beyond that is
reported as not read. Its results wait on disk, not in memory, until the round ends.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import Engine, delete, func, insert, select

from imageshare.archive.dicom_json import NHS_ISSUER
from imageshare.archive.importing import (
    Candidate,
    DicomInputs,
    ImportReport,
    ZipLimits,
)
from imageshare.archive.ingest import IngestService, no_room, out_of_room
from imageshare.audit.trail import AuditEvent, AuditTrail
from imageshare.domain.actors import Actor
from imageshare.domain.errors import (
    ConflictingInstance,
    ImageShareError,
    InvalidInstance,
    OutOfResources,
)
from imageshare.domain.identifiers import normalise_name
from imageshare.storage.blobs import BlobStore, new_blob_key, store_file
from imageshare.storage.files import owned_prefix
from imageshare.storage.index.schema import upload_files, upload_results
from imageshare.uploads import convert
from imageshare.uploads.invitations import Invitation
from imageshare.uploads.receiving import MAX_FILES, NOT_STORED, Arrival

log = logging.getLogger("imageshare.uploads")
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "PatientID",
                "PatientName", "PatientBirthDate", "IssuerOfPatientID",
                "OtherPatientIDsSequence", "Modality", "BodyPartExamined"]
_SERIES = {"photo": (901, "Photos"), "video": (902, "Videos"), "pdf": (903, "Documents")}
_RESULTS_AT_ONCE = 500  # result rows held in memory (and written) at a time
_IDENTITY_DETAIL = {"": "", "match": "", "name": "no NHS number; name and date of birth match",
                    "mismatch": "the patient in the file is not the invited patient"}


# What the uploader is told of a file depends on the file alone, never on what the archive
# holds: every outcome of a readable file (new, a duplicate, held for other patient details,
# or refused as another patient's study: ``conflict``) reads "received"; the reviewer sees
# which it was. ``failed``: something went wrong here, not with the file.
RECEIVED = frozenset({"stored", "duplicate", "kept_first", "replaced", "held", "conflict"})


def uploader_says(outcome: str, detail: str) -> str:
    """A file's outcome in plain words for the person who uploaded it: "received", "not
    needed", "needs checking by the hospital", or "could not be used" with the reason (a
    reason about the file itself: unreadable, a kind not taken, a zip bomb)."""
    if outcome in RECEIVED:
        return "received"
    if outcome == "skipped":
        return "not needed"
    if outcome == "failed":
        return "needs checking by the hospital"
    return f"could not be used: {detail}" if detail else "could not be used"


def staff_says(outcome: str, detail: str) -> str:
    """A file's outcome for staff, with what the archive said of it."""
    return f"{outcome} ({detail})" if detail else outcome


def _refusal(exc: ImageShareError) -> str:
    """The outcome of a file the store or a conversion refused: ``conflict`` (what the
    archive holds stands against it), ``refused`` (the file itself) or ``failed`` (here)."""
    if isinstance(exc, ConflictingInstance):
        return "conflict"
    if isinstance(exc, InvalidInstance) or type(exc) is ImageShareError:
        return "refused"
    return "failed"


@dataclass
class RoundReport:
    """What one round became, in counts (each file's result is in ``upload_results``).
    ``received`` and ``refused`` count as the uploader is told (:func:`uploader_says`);
    ``stored`` and ``held`` are instances made."""

    stored: int = 0
    held: int = 0
    refused: int = 0
    skipped: int = 0
    received: int = 0
    studies: set[str] = field(default_factory=set)


class _Results:
    """A round's result rows, kept in a private file as they come (memory holds a few at a
    time however many files the round has) and written at the round's end."""

    def __init__(self, folder: Path) -> None:
        self._file: IO[bytes] = tempfile.TemporaryFile(dir=folder, suffix=".results")
        self._waiting: list[dict[str, Any]] = []
        self._count = 0

    def add(self, row: dict[str, Any]) -> None:
        """One file's result."""
        self._waiting.append(row)
        self._count += 1
        if len(self._waiting) >= _RESULTS_AT_ONCE:
            self._spill()

    def _spill(self) -> None:
        for row in self._waiting:
            self._file.write(json.dumps(
                {**row, "created_at": row["created_at"].isoformat()}).encode() + b"\n")
        self._waiting.clear()

    def write(self, engine: Engine) -> None:
        """Record every result, all in one transaction (results on record mean the round's
        intake finished: a restart runs it again whole)."""
        if not self._count:
            return
        self._spill()
        self._file.seek(0)
        with engine.begin() as conn:
            rows: list[dict[str, Any]] = []
            for line in self._file:
                row = json.loads(line)
                row["created_at"] = datetime.fromisoformat(row["created_at"])
                rows.append(row)
                if len(rows) >= _RESULTS_AT_ONCE:
                    conn.execute(insert(upload_results), rows)
                    rows = []
            if rows:
                conn.execute(insert(upload_results), rows)
        self._file.seek(0)
        self._file.truncate()
        self._count = 0

    def close(self) -> None:
        """Forget what was not written."""
        self._file.close()


def identity_of(ds: object, invitation: Invitation) -> str:
    """How a DICOM file's patient compares with the invitation's: ``match`` (same NHS
    number), ``name`` (no NHS number to compare; same name and date of birth) or
    ``mismatch``."""
    get = getattr(ds, "get", None)
    if get is None:
        return "mismatch"
    numbers = set()
    if str(get("IssuerOfPatientID", "")).upper() == NHS_ISSUER:
        numbers.add(str(get("PatientID", "")).replace(" ", ""))
    for item in get("OtherPatientIDsSequence", []) or []:
        value = str(item.get("PatientID", "")).replace(" ", "")
        issuer = str(item.get("IssuerOfPatientID", "")).upper()
        if issuer == NHS_ISSUER or (not issuer and value.isdigit() and len(value) == 10):
            numbers.add(value)
    patient_id = str(get("PatientID", "")).replace(" ", "")
    if patient_id.isdigit() and len(patient_id) == 10:
        numbers.add(patient_id)
    if invitation.nhs_number and invitation.nhs_number in numbers:
        return "match"
    if numbers and invitation.nhs_number:
        return "mismatch"
    same_name = normalise_name(str(get("PatientName", ""))) == normalise_name(
        invitation.patient_name)
    same_birth = str(get("PatientBirthDate", "")) == invitation.birth_date
    return "name" if same_name and same_birth else "mismatch"


class UploadIntake:
    """Turns a received round into DICOM instances waiting for review."""

    def __init__(self, engine: Engine, ingest: IngestService, originals: BlobStore,
                 audit: AuditTrail, staging_dir: Path, zip_limits: ZipLimits,
                 parallel: int = 4) -> None:
        self._engine = engine
        self._ingest = ingest
        self._originals = originals
        self._audit = audit
        self._staging = staging_dir
        self._zip_limits = zip_limits
        self._parallel = parallel

    def ensure_room(self, folder: Path, incoming: int, actor: Actor) -> None:
        """Raise :class:`OutOfResources` (audited as a failed store by ``actor``) when the
        archive's disks are below the free-space floor (``min_free_disk_mb``), or when
        ``incoming`` more bytes written into ``folder`` (where uploads are received) would
        take its disk below it: an upload is refused before its bytes are written, never by
        a full disk halfway through (which would stop every other store too)."""
        self._ingest.ensure_room(actor)
        floor_mb = self._ingest.min_free_mb
        if floor_mb <= 0:
            return
        where = folder
        while not where.exists() and where != where.parent:
            where = where.parent  # the folder is made with the first file
        try:
            facts = os.statvfs(where)
        except OSError:
            return
        if facts.f_bavail * facts.f_frsize - max(incoming, 0) < floor_mb << 20:
            refusal = out_of_room(floor_mb)
            try:
                self._audit.record(AuditEvent(actor=actor, action="instance.store",
                                              outcome="failure",
                                              detail={"reason": "out of resources"}))
            except Exception as exc:  # noqa: BLE001 - the refusal itself is what counts
                log.warning("refusal could not be audited: %s", type(exc).__name__)
            raise refusal

    def on_arrival(self, path: Path, invitation: Invitation, actor: Actor) -> Arrival:
        """Store a DICOM file for review as soon as it has arrived, before Send (the intake
        at Send then only reports it, from what this returns): the instance it became, the
        store's outcome and what the file showed, or :data:`NOT_STORED` when the file waits
        for the intake (not DICOM, a DICOMDIR, or refused: the intake gives the reason). The
        received file stays where it is; the blob store takes a second name of it, so its
        bytes are written once."""
        if path.name.upper() == "DICOMDIR":
            return NOT_STORED
        try:
            with open(path, "rb") as fh:
                if convert.sniff(fh.read(132)) != "dicom":
                    return NOT_STORED
            staged = self._ingest.staging_dir / f"{owned_prefix()}{secrets.token_hex(12)}.dcm"
            try:
                os.link(path, staged)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copyfile(path, staged)
            try:
                result = self._ingest.store_staged(staged, actor,
                                                   review_site=invitation.review_site)
            finally:
                staged.unlink(missing_ok=True)
        except ImageShareError:
            return NOT_STORED
        except Exception as exc:  # noqa: BLE001 - the intake at Send tries it again
            log.warning("an uploaded file waits for the intake at Send (%s)",
                        type(exc).__name__)
            return NOT_STORED
        header = result.dataset
        if header is None:
            return Arrival(result.sop_instance_uid, result.outcome)
        return Arrival(result.sop_instance_uid, result.outcome, result.study_uid,
                       identity_of(header, invitation), str(header.get("Modality", "")),
                       str(header.get("BodyPartExamined", "")))

    def _arrivals(self, invitation: Invitation,
                  round_: int) -> dict[str, list[tuple[str, str, Arrival]]]:
        """The round's files stored on arrival: (outcome, path, what it became) by SOP
        Instance UID."""
        c = upload_files.c
        with self._engine.connect() as conn:
            rows = conn.execute(select(
                c.sop_uid, c.outcome, c.path, c.study_uid, c.identity, c.modality,
                c.body_part).where(
                c.invitation_pk == invitation.pk, c.round == round_, c.sop_uid != "",
                c.status.in_(["received", "done"])).order_by(c.pk)).all()
        found: dict[str, list[tuple[str, str, Arrival]]] = {}
        for sop_uid, outcome, path, *facts in rows:
            found.setdefault(sop_uid, []).append((outcome, path,
                                                  Arrival(sop_uid, outcome, *facts)))
        return found

    def _paths_sent_twice(self, invitation: Invitation, round_: int) -> set[str]:
        """Paths of more than one of the round's received files."""
        c = upload_files.c
        with self._engine.connect() as conn:
            return set(conn.execute(select(c.path).where(
                c.invitation_pk == invitation.pk, c.round == round_,
                c.status.in_(["received", "done"])).group_by(c.path).having(
                func.count() > 1)).scalars())

    def reported(self, invitation: Invitation, round_: int) -> tuple[int, int] | None:
        """(files made instances, files refused) of a round whose intake finished, or None
        when it has no results."""
        with self._engine.connect() as conn:
            outcomes = list(conn.execute(select(upload_results.c.outcome).where(
                upload_results.c.invitation_pk == invitation.pk,
                upload_results.c.round == round_)).scalars())
        return _counted(outcomes) if outcomes else None

    def process(self, invitation: Invitation, round_: int, folder: Path, actor: Actor,
                uploader: str, uploaded_at: datetime | None = None,
                progress: Callable[[], None] | None = None) -> RoundReport:
        """Store everything in ``folder`` (one round) for review; never stops on one bad
        file, but stops with :class:`OutOfResources` when the archive has no room (below
        its free-space floor, or a full disk): nothing is then recorded as failed and the
        round's files stay for the job's next attempt. ``actor`` is who stores (the
        uploader, or the member of staff importing); ``progress`` is called after each
        file. Running a round again (after a restart) makes the same instances again: the
        UIDs of converted files follow from the round and the file's name, and the round's
        earlier results are replaced."""
        report = RoundReport()
        lock = threading.Lock()
        now = uploaded_at or datetime.now(UTC)
        seed = f"{invitation.public_id}:{round_}"
        study_uid = generate_uid(entropy_srcs=[seed, "study"])
        series_uids = {kind: generate_uid(entropy_srcs=[seed, "series", kind])
                       for kind in _SERIES}
        with self._engine.begin() as conn:
            conn.execute(delete(upload_results).where(
                upload_results.c.invitation_pk == invitation.pk,
                upload_results.c.round == round_))

        def note(label: str, kind: str, outcome: str, detail: str = "", identity: str = "",
                 study: str = "", sop: str = "", modality: str = "", body_part: str = "",
                 original: tuple[str, str] = ("", "")) -> None:
            with lock:
                if outcome in ("stored", "duplicate"):
                    report.stored += 1
                elif outcome == "held":
                    report.held += 1
                if outcome in RECEIVED:
                    report.received += 1
                elif outcome == "skipped":
                    report.skipped += 1
                else:
                    report.refused += 1
                if study:
                    report.studies.add(study)
                outcomes.add(dict(
                    invitation_pk=invitation.pk, round=round_, label=label[:1024], kind=kind,
                    outcome=outcome, detail=detail[:2000], identity=identity,
                    study_uid=study, sop_uid=sop, modality=modality[:16],
                    body_part=body_part[:64], original_key=original[0],
                    original_sha256=original[1], created_at=datetime.now(UTC)))

        def placement(kind: str, label: str, number: int) -> convert.Placement:
            series_number, _ = _SERIES[kind]
            return convert.Placement(
                study_uid, series_uids[kind], series_number, number, now.astimezone(),
                uploader, invitation.reference, f"original file {Path(label).name}"[:200],
                invitation.expected_body_part,
                generate_uid(entropy_srcs=[seed, "instance", label]))

        arrivals = self._arrivals(invitation, round_)
        # Files stored on arrival whose facts were recorded then, by their path: reported
        # from the record, not read again. A path sent twice in the round (the second file
        # was kept under another name) is read, as which file is which is not recorded.
        twice = self._paths_sent_twice(invitation, round_)
        recorded = {path: made for waiting in arrivals.values()
                    for _outcome, path, made in waiting
                    if made.study_uid and path not in twice}

        def arrived(sop_uid: str) -> str:
            """The outcome of this instance's store on arrival ("" if it was not stored)."""
            with lock:
                waiting = arrivals.get(sop_uid)
                return waiting.pop(0)[0] if waiting else ""

        def known(label: str) -> Arrival | None:
            """The file at ``label`` as stored on arrival, taken from those waiting to be
            reported (None: it is to be read)."""
            made = recorded.get(label)
            if made is None:
                return None
            with lock:
                waiting = arrivals.get(made.sop_uid, [])
                for index, (_outcome, path, _made) in enumerate(waiting):
                    if path == label:
                        del waiting[index]
                        return made
            return None

        def as_recorded(label: str, made: Arrival) -> None:
            """The result of a file stored on arrival, as recorded then."""
            note(label, "dicom", made.outcome, _IDENTITY_DETAIL[made.identity], made.identity,
                 made.study_uid, made.sop_uid, made.modality, made.body_part)

        def one(number: int, candidate: Candidate) -> None:
            label = self._label(folder, candidate.label)
            made = known(label)
            if made is not None:
                as_recorded(label, made)
                if progress is not None:
                    progress()
                return
            try:
                self._one(candidate, label, invitation, actor, note, arrived,
                          lambda kind, label: placement(kind, label, number), walker)
            except OutOfResources:
                raise  # no room: the round stops, its files kept, and runs again later
            except Exception as exc:  # noqa: BLE001 - one bad file never stops a round
                if no_room(exc):
                    raise out_of_room() from exc
                note(label, "refused", "failed", f"unexpected error ({type(exc).__name__})")
            if progress is not None:
                progress()

        entries = sorted(folder.iterdir()) if folder.exists() else []
        # Zip files count by what they expand to against the invitation's limit: what the
        # upload's other files left of it, plus the round's zip files' own bytes.
        allowance = invitation.max_bytes - self._used_bytes(invitation) + sum(
            _zip_size(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        walker = DicomInputs(self._zip_limits, allowance,
                             f"this upload's limit of {invitation.max_bytes >> 20} MB",
                             max_items=MAX_FILES)
        walk_report = ImportReport()
        outcomes = _Results(self._staging)
        try:
            try:
                with ThreadPoolExecutor(max_workers=self._parallel) as pool:
                    window: list[Future[None]] = []
                    for number, candidate in enumerate(
                            walker.candidates([e for e in entries if e.exists()], walk_report),
                            start=1):
                        window.append(pool.submit(one, number, candidate))
                        if len(window) >= 4 * self._parallel:
                            window.pop(0).result()
                    for future in window:
                        future.result()
            finally:
                walker.close()
            # Stored on arrival but not met above (e.g. not listed in the CD's DICOMDIR, or
            # past the round's budget): reported too, so that the reviewer sees every
            # instance the upload made (and not as "not read").
            reported_late: set[str] = set()
            for sop_uid, waiting in arrivals.items():
                while waiting:
                    relative = waiting[0][1]
                    reported_late.add(relative)
                    made = known(relative)
                    if made is not None:
                        as_recorded(relative, made)
                        continue
                    file = folder.joinpath(*relative.split("/"))
                    try:
                        self._dicom(Candidate(str(file), _opener(file)), relative, invitation,
                                    actor, note, arrived)
                    except OSError:
                        pass
                    if waiting and waiting[0][1] == relative:  # not readable now: what is known
                        note(relative, "dicom", waiting.pop(0)[0], "", "", "", sop_uid)
            for label, reason in walk_report.refused:
                if self._label(folder, label) not in reported_late:
                    note(self._label(folder, label), "refused", "refused", reason)
            with lock:
                outcomes.write(self._engine)
        finally:
            outcomes.close()
        self._audit.record(AuditEvent(
            actor=actor, action="upload.receive", outcome="success",
            patient_id=invitation.hospital_number, issuer=invitation.issuer,
            instance_count=report.stored + report.held,
            detail={"upload": invitation.public_id, "round": round_,
                    "refused": report.refused}))
        return report

    def _used_bytes(self, invitation: Invitation) -> int:
        """Bytes announced for the invitation so far, every round (as the receiver counts
        them against its limit)."""
        c = upload_files.c
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(c.length), 0)).where(
                c.invitation_pk == invitation.pk, c.status != "removed")).scalar() or 0)

    @staticmethod
    def _label(folder: Path, label: str) -> str:
        """A file's name as the uploader knows it (relative to the round's folder)."""
        return label.replace(str(folder) + os.sep, "").replace(str(folder), "")

    def _one(self, candidate: Candidate, label: str, invitation: Invitation, actor: Actor,
             note: Callable[..., None], arrived: Callable[[str], str],
             placement: Callable[[str, str], convert.Placement],
             allowance: convert.ByteAllowance) -> None:
        with candidate.open() as stream:
            head = stream.read(132)
        kind = convert.sniff(head)
        if kind == "dicom":
            self._dicom(candidate, label, invitation, actor, note, arrived)
            return
        if candidate.on_media:  # a CD's viewer program, its icons and manuals: not images
            note(label, "other", "skipped", "on the CD but not listed in its index "
                 "(DICOMDIR): part of the CD's viewer program, not the patient's images")
            return
        if kind in ("unknown", "zip"):
            if kind == "zip":
                note(label, "zip", "refused", "a zip file inside a zip file is not opened")
            elif Path(label).name.upper() == "DICOMDIR" or not candidate.explicit:
                note(label, "other", "skipped", "not DICOM, a photo, a video or a PDF")
            else:
                note(label, "other", "refused",
                     "not a kind of file the hospital can take (DICOM, photos, videos, PDF)")
            return
        try:
            spool = self._spool(candidate)
        except ImageShareError as exc:  # a zip member larger than stated, or than allowed
            note(label, "other", _refusal(exc), str(exc))
            return
        try:
            converted_kind = {"jpeg": "photo", "png": "photo", "heic": "photo"}.get(kind, kind)
            if kind == "heic" and not convert.heic_supported():
                note(label, "photo", "refused", "HEIC photos cannot be read here; send JPEG")
                return
            where = placement(converted_kind, label)
            warning = ""
            out, staged = self._ingest.staging_file()
            try:
                if converted_kind == "pdf":  # unreadable: refused; active content: flagged
                    warning = convert.pdf_warning(spool)
                with out:
                    if converted_kind == "photo":
                        convert.photo(spool, invitation.details(), where, out, allowance)
                    elif converted_kind == "video":
                        convert.video(spool, invitation.details(), where, out)
                    else:
                        convert.pdf(spool, invitation.details(), where,
                                    Path(label).stem, out)
                result = self._ingest.store_staged(staged, actor,
                                                   review_site=invitation.review_site)
            except OutOfResources:
                raise
            except ImageShareError as exc:
                note(label, converted_kind, _refusal(exc), str(exc))
                return
            finally:
                staged.unlink(missing_ok=True)
            key = new_blob_key()
            kept = store_file(self._originals, key, spool)
            note(label, converted_kind, result.outcome, warning, "match", result.study_uid,
                 result.sop_instance_uid, "XC" if converted_kind != "pdf" else "DOC",
                 invitation.expected_body_part, (key, kept.sha256))
        finally:
            spool.unlink(missing_ok=True)

    def _spool(self, candidate: Candidate) -> Path:
        """A private copy of a non-DICOM file (readers need a path; zip members have none)."""
        fd, name = tempfile.mkstemp(dir=self._staging, prefix=owned_prefix(), suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as out, candidate.open() as src:
                shutil.copyfileobj(src, out, 1 << 20)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def _dicom(self, candidate: Candidate, label: str, invitation: Invitation, actor: Actor,
               note: Callable[..., None], arrived: Callable[[str], str]) -> None:
        try:
            with candidate.open() as stream:
                header = dcmread(stream, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception:  # noqa: BLE001 - the pipeline gives the reason below
            header = None
        if header is not None and str(header.get("SOPClassUID", "")) == _MEDIA_DIRECTORY:
            note(label, "dicom", "skipped", "the CD's DICOMDIR (its references were followed)")
            return
        identity = identity_of(header, invitation) if header is not None else ""
        sop_uid = str(header.get("SOPInstanceUID", "")) if header is not None else ""
        outcome = arrived(sop_uid) if sop_uid else ""
        if outcome and header is not None:  # stored on arrival: reported, not made again
            study_uid, warning = str(header.get("StudyInstanceUID", "")), ""
        else:
            try:
                with candidate.open() as stream:
                    result = self._ingest.store_stream(stream, actor,
                                                       review_site=invitation.review_site)
            except OutOfResources:
                raise
            except ImageShareError as exc:
                note(label, "dicom", _refusal(exc), str(exc))
                return
            outcome, study_uid, warning = result.outcome, result.study_uid, result.warning
            sop_uid = result.sop_instance_uid
        detail = _IDENTITY_DETAIL[identity]
        note(label, "dicom", outcome, detail if identity else warning, identity,
             study_uid, sop_uid,
             str(header.get("Modality", "")) if header is not None else "",
             str(header.get("BodyPartExamined", "")) if header is not None else "")


def _counted(rows: list[str]) -> tuple[int, int]:
    """(received, could not be used) as :class:`RoundReport` counts them."""
    made = sum(1 for r in rows if r in RECEIVED)
    return made, sum(1 for r in rows if r not in RECEIVED and r != "skipped")


def _zip_size(path: Path) -> int:
    """The size of the file at ``path`` when it is a zip file (as the walker finds one: from
    its end), else 0."""
    try:
        with open(path, "rb") as fh:
            return fh.seek(0, os.SEEK_END) if zipfile.is_zipfile(fh) else 0
    except OSError:
        return 0


def _opener(path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open(path, "rb")

    return opener


def results(engine: Engine, invitation: Invitation) -> list[dict[str, object]]:
    """What every file of the invitation became, in order."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(upload_results).where(
            upload_results.c.invitation_pk == invitation.pk).order_by(
            upload_results.c.pk)).mappings()]

