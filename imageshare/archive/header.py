"""Reading and checking the header of a received instance without loading its pixel data."""

from __future__ import annotations

import os
import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from imageshare.archive.pixel_budget import check_pixel_budget
from imageshare.domain.errors import InvalidInstance
from imageshare.domain.identifiers import is_valid_uid, normalise_name

PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "OtherPatientNames", "EthnicGroup", "PatientComments", "SpecificCharacterSet",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "PatientAge", "PatientSize", "PatientWeight", "AdditionalPatientHistory",
    "ProcedureCodeSequence", "TimezoneOffsetFromUTC", "InstitutionName",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "OperatorsName",
    "PerformingPhysicianName", "ProtocolName", "Manufacturer", "ManufacturerModelName",
    "StationName", "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName",
    "SoftwareVersions",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def level_json(ds: Dataset, keywords: tuple[str, ...]) -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the given attributes of ``ds`` that are present."""
    subset = Dataset()
    for keyword in keywords:
        if keyword in ds:
            subset[keyword] = ds[keyword]
    try:
        return subset.to_json_dict(bulk_data_threshold=65536, bulk_data_element_handler=None)
    except Exception:  # noqa: BLE001 - a malformed optional value must not block storage
        clean = Dataset()
        for keyword in keywords:
            if keyword in ds and keyword.endswith("UID"):
                clean[keyword] = ds[keyword]
        return clean.to_json_dict()


@dataclass(frozen=True)
class InstanceHeader:
    """What the index needs of one instance, read from its header."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str
    sex: str
    other_ids: list[tuple[str, str, str]]
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    dataset: Dataset = field(repr=False, compare=False)

    @cached_property
    def patient_json(self) -> dict[str, Any]:
        """DICOM JSON of the patient-level attributes (computed when a patient is new)."""
        return level_json(self.dataset, PATIENT_KEYWORDS)

    @cached_property
    def study_json(self) -> dict[str, Any]:
        """DICOM JSON of the study-level attributes (computed when a study is new)."""
        return level_json(self.dataset, STUDY_KEYWORDS)

    @cached_property
    def series_json(self) -> dict[str, Any]:
        """DICOM JSON of the series-level attributes (computed when a series is new)."""
        return level_json(self.dataset, SERIES_KEYWORDS)

    @property
    def name_norm(self) -> str:
        """The patient name folded for matching."""
        return normalise_name(self.patient_name)


def _other_ids(ds: Dataset) -> list[tuple[str, str, str]]:
    ids: list[tuple[str, str, str]] = []
    for item in ds.get("OtherPatientIDsSequence", []) or []:
        value = _text(item, "PatientID")
        if value:
            kind = _text(item, "TypeOfPatientID")
            ids.append((value[:64], _text(item, "IssuerOfPatientID")[:64], kind[:16]))
    legacy = ds.get((0x0010, 0x1000))
    if legacy is not None and legacy.value:
        values = legacy.value if isinstance(legacy.value, list | tuple) else [legacy.value]
        for value in values:
            text = str(value).strip()
            if text and text not in {i[0] for i in ids}:
                ids.append((text[:64], "", ""))
    return ids


def header_from_dataset(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    """Check that ``ds`` identifies itself fully and extract the indexed attributes."""
    for keyword in _REQUIRED_UIDS:
        value = _text(ds, keyword)
        if not value:
            raise InvalidInstance(f"the instance has no {keyword}")
        if not is_valid_uid(value):
            raise InvalidInstance(f"the instance's {keyword} is not a valid DICOM UID")
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstance("the file meta information has no valid Transfer Syntax UID")
    check_pixel_budget(ds)  # a decompression bomb is refused here, before it is stored
    return InstanceHeader(
        sop_class_uid=_text(ds, "SOPClassUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        transfer_syntax=transfer_syntax,
        patient_id=_text(ds, "PatientID")[:64],
        issuer=_text(ds, "IssuerOfPatientID")[:64],
        patient_name=_text(ds, "PatientName")[:324],
        birth_date=_text(ds, "PatientBirthDate")[:8],
        sex=_text(ds, "PatientSex")[:16],
        other_ids=_other_ids(ds),
        study={
            "study_date": _text(ds, "StudyDate")[:8],
            "study_time": _text(ds, "StudyTime")[:16],
            "accession_number": _text(ds, "AccessionNumber")[:16],
            "study_id": _text(ds, "StudyID")[:16],
            "description": _text(ds, "StudyDescription")[:64],
            "description_norm": normalise_name(_text(ds, "StudyDescription"))[:64],
            "referring_name": _text(ds, "ReferringPhysicianName")[:324],
            "referring_norm": normalise_name(_text(ds, "ReferringPhysicianName"))[:324],
        },
        series={
            "modality": _text(ds, "Modality")[:16],
            "series_number": _int(ds, "SeriesNumber"),
            "description": _text(ds, "SeriesDescription")[:64],
            "body_part": _text(ds, "BodyPartExamined")[:16],
        },
        instance={
            "instance_number": _int(ds, "InstanceNumber"),
            "number_of_frames": _int(ds, "NumberOfFrames") or 1,
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "bits_allocated": _int(ds, "BitsAllocated"),
        },
        dataset=ds,
    )


@dataclass(frozen=True)
class PixelDataLocation:
    """Where the pixel data value starts in a file; ``length`` is None when encapsulated."""

    value_offset: int
    length: int | None


def locate_pixel_data(fp: BinaryIO, size: int, transfer_syntax: str) -> PixelDataLocation | None:
    """Read the pixel data element header at ``fp``'s position and check it fits in the file.

    ``fp`` must sit where ``dcmread(stop_before_pixels=True)`` stopped. For encapsulated data
    every fragment header is walked (without reading fragments) so that truncation is found.
    """
    start = fp.tell()
    if start >= size:
        return None
    endian = ">" if transfer_syntax == _BIG_ENDIAN else "<"
    head = fp.read(8)
    if len(head) < 8:
        raise InvalidInstance("the file ends in the middle of the pixel data header")
    group, element = struct.unpack(endian + "HH", head[:4])
    if (group << 16 | element) not in _PIXEL_TAGS:
        return None
    if transfer_syntax == _IMPLICIT:
        (length,) = struct.unpack(endian + "I", head[4:8])
        pos = start + 8
    else:
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"UN", b"OV"):
            extra = fp.read(4)
            if len(extra) < 4:
                raise InvalidInstance("the file ends in the middle of the pixel data header")
            (length,) = struct.unpack(endian + "I", extra)
            pos = start + 12
        else:
            (length,) = struct.unpack(endian + "H", head[6:8])
            pos = start + 8
    if length != 0xFFFFFFFF:
        if pos + length > size:
            raise InvalidInstance(
                f"the file is truncated: pixel data needs {length} bytes, {size - pos} present"
            )
        return PixelDataLocation(pos, length)
    value_offset = pos
    while True:
        fp.seek(pos)
        item = fp.read(8)
        if len(item) < 8:
            raise InvalidInstance("the file is truncated inside the encapsulated pixel data")
        tag_group, tag_element, item_length = struct.unpack("<HHI", item)
        tag = tag_group << 16 | tag_element
        pos += 8
        if tag == _SEQ_END:
            return PixelDataLocation(value_offset, None)
        if tag != _ITEM or item_length == 0xFFFFFFFF:
            raise InvalidInstance("the encapsulated pixel data is malformed")
        if pos + item_length > size:
            raise InvalidInstance("the file is truncated inside the encapsulated pixel data")
        pos += item_length


def read_header(path: Path, fp: BinaryIO | None = None) -> tuple[Dataset, InstanceHeader]:
    """Parse the header of the Part 10 file at ``path`` (or already open as ``fp``) and check
    that it is complete. Raises :class:`InvalidInstance` with a reason a user can act on.
    """
    size = os.fstat(fp.fileno()).st_size if fp is not None else os.path.getsize(path)
    if size < 132:
        raise InvalidInstance("the file is too short to be a DICOM file")
    parsed: list[Dataset] = []
    try:
        return _read_header(path, fp, size, parsed)
    except InvalidInstance as exc:
        if parsed:  # say which instance was refused, as far as it could be read
            ds = parsed[0]
            exc.sop_class_uid = _uid_or_empty(ds, "SOPClassUID", "MediaStorageSOPClassUID")
            exc.sop_instance_uid = _uid_or_empty(
                ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID"
            )
        raise


def _uid_or_empty(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    try:
        value = str(ds.get(keyword) or ds.file_meta.get(meta_keyword) or "")
    except Exception:  # noqa: BLE001 - an undecodable value: nothing to report
        return ""
    return value if is_valid_uid(value) else ""


def _read_header(
    path: Path, fp: BinaryIO | None, size: int, parsed: list[Dataset]
) -> tuple[Dataset, InstanceHeader]:
    try:
        with open(path, "rb") if fp is None else nullcontext(fp) as source:
            source.seek(0)
            ds = dcmread(source, stop_before_pixels=True)
            parsed.append(ds)
            locate_pixel_data(source, size, str(ds.file_meta.get("TransferSyntaxUID", "")))
    except InvalidInstance:
        raise
    except InvalidDicomError as exc:
        raise InvalidInstance(
            "not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)"
        ) from exc
    except (EOFError, OSError, ValueError, struct.error, KeyError, TypeError,
            NotImplementedError, OverflowError, MemoryError, AttributeError) as exc:
        raise InvalidInstance(f"the DICOM data cannot be parsed: {type(exc).__name__}") from exc
    if Tag(0x00020010) not in ds.file_meta:
        raise InvalidInstance("the file meta information has no Transfer Syntax UID")
    try:
        return ds, header_from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    except InvalidInstance:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoding failure of a value is bad input
        raise InvalidInstance(f"a header value cannot be decoded: {type(exc).__name__}") from exc
