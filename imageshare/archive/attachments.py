"""Reports and documents attached to a study, stored as DICOM in that study.

A PDF becomes an Encapsulated PDF instance; a photo (of a paper report, a wound, a screen)
becomes a Secondary Capture image. Both go through the one ingest pipeline, so PACS and other
viewers see them like any other instance.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import Dataset, dcmread
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from imageshare import __version__
from imageshare.archive.ingest import IngestService, StoreResult
from imageshare.archive.studies import (
    ATTACHMENT_SERIES,
    ENCAPSULATED_PDF,
    SECONDARY_CAPTURE,
    StudyCatalogue,
    StudyRecord,
)
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ImageShareError, NotFound

MAX_ATTACHMENT = 100 * 1024 * 1024
MAX_PIXELS = 60_000_000
MANUFACTURER = "ImageShare"
_SERIES_NUMBER = {"DOC": 9901, "OT": 9902}


@dataclass(frozen=True)
class Document:
    """A stored document's content, ready to hand to a browser."""

    media_type: str
    content: bytes
    title: str


def _study_dataset(study: StudyRecord) -> Dataset:
    """The patient and study attributes every new instance of ``study`` carries."""
    ds = Dataset.from_json({k: v for k, v in study.attrs.items()
                            if k not in ("0020000D",)})
    return ds


def _base_kwargs(study: StudyRecord, series_uid: str, series_number: int, modality: str,
                 sop_class: str) -> dict[str, Any]:
    p = study.patient
    return {
        "study_instance_uid": study.study_uid,
        "series_instance_uid": series_uid,
        "series_number": series_number,
        "sop_instance_uid": generate_uid(),
        "sop_class_uid": sop_class,
        "instance_number": 1,
        "modality": modality,
        "manufacturer": MANUFACTURER,
        "patient_id": p.patient_id or None,
        "patient_name": p.name or None,
        "patient_birth_date": p.birth_date or None,
        "patient_sex": p.sex or None,
        "accession_number": study.accession or None,
        "study_id": study.study_id or None,
        "study_date": study.study_date or None,
        "study_time": study.study_time or None,
        "referring_physician_name": study.referring or None,
    }


def _base_name(filename: str) -> str:
    """A browser's file name without its folders (``/`` or ``\\``, as old browsers and
    Windows send them) or its extension."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[0] if "." in base[1:] else base


def _title(text: str) -> str:
    """``text`` fit for a Document Title: control characters (CR, LF, NUL...) made spaces,
    runs of blanks made one, at most 64 characters."""
    cleaned = "".join(" " if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text or "")
    return " ".join(cleaned.split())[:64]


class AttachmentService:
    """Attaches PDFs and photos to studies and reads them back."""

    def __init__(self, catalogue: StudyCatalogue, ingest: IngestService) -> None:
        self._catalogue = catalogue
        self._ingest = ingest

    def _series_uid(self, study: StudyRecord, modality: str) -> tuple[str, int]:
        for s in study.series:
            if s.description == ATTACHMENT_SERIES and s.modality == modality:
                return s.series_uid, len(s.instances) + 1
        return generate_uid(), 1

    def attach(self, study_uid: str, filename: str, content: bytes, title: str,
               actor: Actor) -> StoreResult:
        """Store ``content`` (a PDF, JPEG or PNG) in the study as DICOM; returns the stored
        instance. Raises ImageShareError for anything else or for oversized files."""
        if not content:
            raise ImageShareError("the file is empty")
        if len(content) > MAX_ATTACHMENT:
            raise ImageShareError("attachments are limited to 100 MB")
        study = self._catalogue.record(study_uid)
        title = _title(title) or _title(_base_name(filename)) or "Document"
        if content.startswith(b"%PDF-"):
            if b"%%EOF" not in content[-1024:]:
                # A PDF ends with its trailer's end-of-file marker (ISO 32000-1 7.5.5): without
                # it the file was cut short, or is something else behind a PDF header.
                raise ImageShareError("the PDF is incomplete (it has no end-of-file marker); "
                                      "save or download it again and attach that copy")
            ds = self._pdf(study, content, title)
        else:
            ds = self._photo(study, content, title)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        out.seek(0)
        return self._ingest.store_stream(out, actor, expected_study=study_uid)

    def _extra(self, ds: Dataset, study: StudyRecord, title: str, number: int) -> None:
        source = _study_dataset(study)
        for keyword in ("IssuerOfPatientID", "OtherPatientIDsSequence", "StudyDescription",
                        "SpecificCharacterSet"):
            if keyword in source:
                ds[keyword] = source[keyword]
        ds.SeriesDescription = ATTACHMENT_SERIES
        ds.InstanceNumber = number
        ds.SoftwareVersions = __version__
        now = datetime.now()
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.ContentTime = now.strftime("%H%M%S")
        ds.SeriesDate = ds.ContentDate
        ds.SeriesTime = ds.ContentTime
        ds.DocumentTitle = title

    def _pdf(self, study: StudyRecord, content: bytes, title: str) -> Dataset:
        import highdicom as hd  # loaded by the processes that build attachments

        series_uid, number = self._series_uid(study, "DOC")
        ds = hd.SOPClass(
            **_base_kwargs(study, series_uid, _SERIES_NUMBER["DOC"], "DOC", ENCAPSULATED_PDF),
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        self._extra(ds, study, title, number)
        ds.ConversionType = "WSD"
        ds.BurnedInAnnotation = "YES"
        ds.ConceptNameCodeSequence = []
        ds.AcquisitionDateTime = str(ds.ContentDate) + str(ds.ContentTime)
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        ds.EncapsulatedDocumentLength = len(content)
        ds.EncapsulatedDocument = content + (b"\0" if len(content) % 2 else b"")
        return ds

    def _photo(self, study: StudyRecord, content: bytes, title: str) -> Dataset:
        try:
            with Image.open(io.BytesIO(content)) as img:
                if img.format not in ("JPEG", "PNG"):
                    raise ImageShareError("attach a PDF, a JPEG or a PNG file")
                if img.width * img.height > MAX_PIXELS:
                    raise ImageShareError("the photo has too many pixels (at most 60 million)")
                rgb = ImageOps.exif_transpose(img).convert("RGB")
        except Image.DecompressionBombError as exc:  # more pixels than Pillow opens at all
            raise ImageShareError("the photo has too many pixels (at most 60 million)") from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ImageShareError("attach a PDF, a JPEG or a PNG file") from exc
        series_uid, number = self._series_uid(study, "OT")
        kwargs = _base_kwargs(study, series_uid, _SERIES_NUMBER["OT"], "OT", SECONDARY_CAPTURE)
        for key in ("sop_class_uid", "modality"):
            kwargs.pop(key)
        import highdicom as hd

        ds = hd.sc.SCImage(
            pixel_array=np.asarray(rgb), photometric_interpretation="YBR_FULL_422",
            bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"),
            transfer_syntax_uid=JPEGBaseline8Bit, **kwargs,
        )
        ds.Modality = "OT"
        self._extra(ds, study, title, number)
        ds.BurnedInAnnotation = "YES"
        return ds

    def document(self, blob: io.BufferedIOBase | Any) -> Document:
        """The content of a stored Encapsulated PDF (other classes: NotFound)."""
        ds = dcmread(blob)
        if ds.get("SOPClassUID") != ENCAPSULATED_PDF or "EncapsulatedDocument" not in ds:
            raise NotFound("the instance is not a PDF document")
        content = bytes(ds.EncapsulatedDocument)
        length = ds.get("EncapsulatedDocumentLength")
        if length:
            content = content[: int(length)]
        elif content.endswith(b"\0"):
            content = content[:-1]
        return Document("application/pdf", content, str(ds.get("DocumentTitle", "")))
