"""Reading and checking the header of a received instance without loading its pixel data."""

from __future__ import annotations

import logging
import os
import struct
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID

from imageshare.archive.dicom_json import element_json
from imageshare.archive.pixel_budget import check_pixel_budget
from imageshare.archive.structure import Structure, check_structure
from imageshare.domain.errors import InvalidInstance, UndecodableImage
from imageshare.domain.identifiers import is_valid_uid, normalise_name

PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "OtherPatientNames", "EthnicGroup", "PatientComments", "SpecificCharacterSet",
    "ReferencedPatientSequence",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyID", "StudyDescription", "ReferringPhysicianName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "PatientAge", "PatientSize", "PatientWeight", "AdditionalPatientHistory",
    "ProcedureCodeSequence", "TimezoneOffsetFromUTC", "InstitutionName",
    "ReferencedStudySequence", "Occupation",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
    "SeriesTime", "BodyPartExamined", "Laterality", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "OperatorsName",
    "PerformingPhysicianName", "ProtocolName", "Manufacturer", "ManufacturerModelName",
    "StationName", "DeviceSerialNumber", "InstitutionName", "InstitutionalDepartmentName",
    "SoftwareVersions",
)
# The sequences among those keywords hold a handful of items in real instances.
MAX_INDEXED_ITEMS = 64
_INDEXED_SEQUENCES = frozenset(
    int(tag_for_keyword(k) or 0) for k in (*PATIENT_KEYWORDS, *STUDY_KEYWORDS, *SERIES_KEYWORDS)
    if dictionary_VR(tag_for_keyword(k) or 0) == "SQ")
log = logging.getLogger("imageshare.ingest")
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_IMPLICIT = "1.2.840.10008.1.2"
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
# Video is one stream in as many fragments as its encoder chose, whatever the frame count.
_VIDEO = frozenset({
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1", "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.104.1", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1", "1.2.840.10008.1.2.4.107",
    "1.2.840.10008.1.2.4.108",
})
# Compressed syntaxes whose pixel data is nevertheless native (deflated data set).
_NATIVE_ALLOWED = frozenset({"1.2.840.10008.1.2.1.99"})


def _text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as text; "" when absent or when it cannot be decoded (a value
    that does not fit its VR is not a reason to refuse an instance)."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # noqa: BLE001 - undecodable: the required UIDs are checked apart
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except Exception:  # noqa: BLE001 - not a number: indexed as unknown
        return None


def _as_received(element: Any) -> dict[str, Any] | None:
    """DICOM JSON of a text element whose value does not fit its VR: the values as they were
    sent (PS3.18 F.2.3 allows strings for IS and DS). None for other kinds of element."""
    value = element.value
    if element.VR in ("SQ", "OB", "OW", "OD", "OF", "OL", "OV", "UN", "AT", "US", "SS", "UL",
                      "SL", "FL", "FD", "SV", "UV"):
        return None
    values = list(value) if isinstance(value, list | tuple) or type(
        value).__name__ == "MultiValue" else [value]
    return {"vr": element.VR, "Value": [str(v).strip() for v in values]}


def level_json(ds: Dataset, keywords: tuple[str, ...], instance: str = "") -> dict[str, Any]:
    """DICOM JSON (PS3.18 F.2) of the given attributes of ``ds`` that are present, written
    as the WADO-RS metadata writes them (:func:`element_json`), so that a QIDO-RS answer
    and the metadata agree on every stored value.

    An attribute whose value cannot be converted for its VR is kept as received when it is
    text, else left out; either way the log names the instance and the attribute (no value).
    """
    result: dict[str, Any] = {}
    for keyword in keywords:
        tag = int(tag_for_keyword(keyword) or 0)
        try:
            if not tag or tag not in ds:
                continue
        except Exception:  # noqa: BLE001 - undecodable data set: nothing to index
            continue
        key = f"{tag:08X}"
        written = element_json(ds, tag, instance)
        if written is not None:
            result[key] = written
            continue
        try:
            kept = _as_received(ds[tag])
        except Exception:  # noqa: BLE001 - undecodable element: left out
            kept = None
        if kept is not None:
            result[key] = kept
        log.warning("instance %s: attribute %s does not fit its VR; %s", instance or "?", key,
                    "kept as received" if kept is not None else "left out of the index")
    return result


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
        return level_json(self.dataset, PATIENT_KEYWORDS, self.sop_instance_uid)

    @cached_property
    def study_json(self) -> dict[str, Any]:
        """DICOM JSON of the study-level attributes (computed when a study is new)."""
        return level_json(self.dataset, STUDY_KEYWORDS, self.sop_instance_uid)

    @cached_property
    def series_json(self) -> dict[str, Any]:
        """DICOM JSON of the series-level attributes (computed when a series is new)."""
        return level_json(self.dataset, SERIES_KEYWORDS, self.sop_instance_uid)

    @property
    def name_norm(self) -> str:
        """The patient name folded for matching."""
        return normalise_name(self.patient_name)


def _other_ids(ds: Dataset) -> list[tuple[str, str, str]]:
    try:
        return _read_other_ids(ds)
    except Exception:  # noqa: BLE001 - undecodable other IDs are not indexed
        log.warning("other patient IDs of an instance cannot be read; not indexed")
        return []


def _read_other_ids(ds: Dataset) -> list[tuple[str, str, str]]:
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
    that it is complete: the whole data set is structurally sound, the required UIDs are
    there, and the pixel data matches its description. Raises :class:`InvalidInstance` with a
    reason a user can act on, whatever is wrong with the file.

    Values that merely do not fit their VR (an Instance Number ``1A``, a birth date
    ``19700231``) outside the required UIDs and the pixel description are not refused: the
    instance is kept as received and indexed where its values can be read.
    """
    size = os.fstat(fp.fileno()).st_size if fp is not None else os.path.getsize(path)
    if size < 132:
        raise InvalidInstance("the file is too short to be a DICOM file")
    parsed: list[Dataset] = []
    try:
        return _read_header(path, fp, size, parsed)
    except InvalidInstance as exc:
        # Say which instance was refused, as far as it could be read (the file meta
        # information names it even when the data set is damaged).
        ds = parsed[0] if parsed else _meta_only(path, fp)
        if ds is not None:
            exc.sop_class_uid = _uid_or_empty(ds, "SOPClassUID", "MediaStorageSOPClassUID")
            exc.sop_instance_uid = _uid_or_empty(
                ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID"
            )
        raise
    except Exception as exc:  # noqa: BLE001 - whatever else fails on bad input is a refusal
        raise InvalidInstance(f"the DICOM data cannot be parsed: {type(exc).__name__}") from exc


def _check_indexed_sequences(structure: Structure) -> None:
    """Refuse a file whose patient, study or series sequences (read, kept in the index and
    answered to queries) hold more items than any real instance does: each parsed item
    costs about a kilobyte of memory, and a few megabytes of file can hold hundreds of
    thousands."""
    for tag, count in structure.top_items.items():
        if count > MAX_INDEXED_ITEMS and tag in _INDEXED_SEQUENCES:
            raise InvalidInstance(
                f"{keyword_for_tag(tag)} holds {count} items (at most {MAX_INDEXED_ITEMS} "
                "are accepted)")


def _meta_only(path: Path, fp: BinaryIO | None) -> Dataset | None:
    """The file meta information alone (a data set holding nothing else), or None."""
    try:
        with open(path, "rb") if fp is None else nullcontext(fp) as source:
            source.seek(132)
            meta = _read_file_meta_info(source)
    except Exception:  # noqa: BLE001 - no readable meta: nothing to name
        return None
    ds = Dataset()
    ds.file_meta = meta
    return ds


def _uid_or_empty(ds: Dataset, keyword: str, meta_keyword: str) -> str:
    try:
        value = str(ds.get(keyword) or ds.file_meta.get(meta_keyword) or "")
    except Exception:  # noqa: BLE001 - an undecodable value: nothing to report
        return ""
    return value if is_valid_uid(value) else ""


def _read_header(
    path: Path, fp: BinaryIO | None, size: int, parsed: list[Dataset]
) -> tuple[Dataset, InstanceHeader]:
    with open(path, "rb") if fp is None else nullcontext(fp) as source:
        # The structure first: nothing decodes a file whose element lengths lie or whose
        # sequences nest without end.
        structure = check_structure(source, size)
        _check_indexed_sequences(structure)
        source.seek(0)
        try:
            ds = dcmread(source, stop_before_pixels=True)
        except InvalidDicomError as exc:
            raise InvalidInstance(
                "not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)"
            ) from exc
        except Exception as exc:  # noqa: BLE001 - RecursionError, struct.error, ...: bad input
            raise InvalidInstance(
                f"the DICOM data cannot be parsed: {type(exc).__name__}") from exc
    parsed.append(ds)
    if Tag(0x00020010) not in ds.file_meta:
        raise InvalidInstance("the file meta information has no Transfer Syntax UID")
    try:
        header = header_from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))
    except InvalidInstance:
        raise
    except Exception as exc:  # noqa: BLE001 - a required value that cannot be decoded
        raise InvalidInstance(f"a header value cannot be decoded: {type(exc).__name__}") from exc
    frames = check_pixel_data(ds, structure)
    if frames is not None:
        # A decompression bomb is refused here, before it is stored: the budget is checked
        # on the pixel description just verified (and the frame count it holds).
        declared = Dataset()
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
            if keyword in ds:
                declared[keyword] = ds[keyword]
        declared.NumberOfFrames = frames
        check_pixel_budget(declared)
        header.instance["number_of_frames"] = frames
    return ds, header


def _pixel_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """A value of the pixel description: required (unless it has a default) and readable."""
    name = ds_name(keyword)
    if keyword not in ds:
        if default is not None:
            return default
        raise InvalidInstance(f"the instance has pixel data but no {name}")
    try:
        value = ds[keyword].value
        number = int(value[0] if isinstance(value, list | tuple) else value)
    except Exception as exc:  # noqa: BLE001 - any undecodable value
        raise InvalidInstance(f"the instance's {name} cannot be read") from exc
    if number < (0 if default == 0 else 1):
        raise InvalidInstance(f"the instance's {name} is {number}")
    return number


def ds_name(keyword: str) -> str:
    """An attribute's keyword in words (``BitsAllocated`` -> ``Bits Allocated``)."""
    return "".join(f" {c}" if c.isupper() and i else c for i, c in enumerate(keyword))


def _frames_declared(ds: Dataset) -> int | None:
    """Number of Frames when it can be read (None when absent or not a number)."""
    if "NumberOfFrames" not in ds:
        return 1
    try:
        value = ds["NumberOfFrames"].value
        number = int(str(value).strip()) if value not in (None, "") else 1
    except (TypeError, ValueError):
        return None
    return number if number >= 1 else None


def check_pixel_data(ds: Dataset, structure: Structure) -> int | None:
    """Check the pixel data against its description; returns the number of frames (None when
    the instance has no pixel data). Raises :class:`InvalidInstance` with the reason.

    Native pixel data must hold Rows x Columns x Samples per Pixel x Bits Allocated x Number
    of Frames (one pad byte allowed); encapsulated pixel data must be a Basic Offset Table
    (empty, or one entry per frame, increasing from 0) followed by at least one fragment per
    frame (video: one stream). A Number of Frames that cannot be read is taken from a native
    length that holds a whole number of frames (encapsulated: refused).
    """
    pixel = structure.pixel_data
    if pixel is None:
        return None
    syntax = UID(structure.transfer_syntax)
    rows = _pixel_int(ds, "Rows")
    columns = _pixel_int(ds, "Columns")
    bits = _pixel_int(ds, "BitsAllocated")
    samples = _pixel_int(ds, "SamplesPerPixel", 1)
    if bits != 1 and bits % 8:
        raise InvalidInstance(f"Bits Allocated {bits} is neither 1 nor a multiple of 8")
    declared = _frames_declared(ds)
    if pixel.length is not None:
        if syntax.is_encapsulated and syntax not in _NATIVE_ALLOWED:
            raise InvalidInstance(
                "the transfer syntax is compressed but the pixel data is not encapsulated")
        return _check_native(ds, pixel.length, rows, columns, samples, bits, declared)
    if not syntax.is_encapsulated:
        raise InvalidInstance(
            "the pixel data is encapsulated but the transfer syntax is not compressed")
    if pixel.fragments == 0:
        raise InvalidInstance("the encapsulated pixel data holds no fragments")
    if declared is None:  # compressed frames cannot be counted from the length
        raise UndecodableImage("the image's NumberOfFrames is not a whole number")
    table = pixel.offset_table
    if table and (table[0] != 0 or any(b <= a for a, b in zip(table, table[1:], strict=False))):
        raise InvalidInstance("the basic offset table does not increase from 0")
    frames = declared
    if table and len(table) != frames:
        raise InvalidInstance(
            f"the basic offset table lists {len(table)} frames; Number of Frames says {frames}")
    if syntax not in _VIDEO and frames > pixel.fragments:
        raise InvalidInstance(
            f"Number of Frames is {frames} but the pixel data holds {pixel.fragments} "
            "fragment(s)")
    return frames


def _check_native(
    ds: Dataset, length: int, rows: int, columns: int, samples: int, bits: int,
    declared: int | None,
) -> int:
    pixels = rows * columns * samples
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if bits == 1:
        frame_bytes = None
        per_frame_bits = pixels
    else:
        frame_bytes = pixels * (bits // 8)
        if photometric == "YBR_FULL_422" and samples == 3:
            frame_bytes = frame_bytes // 3 * 2  # two samples per pixel in the stored data
        per_frame_bits = frame_bytes * 8
    frames = declared
    if frames is None:  # unreadable: a whole number of frames in the data is accepted
        if length and length * 8 % per_frame_bits in (0, 8) and length * 8 >= per_frame_bits:
            frames = length * 8 // per_frame_bits
        else:
            raise InvalidInstance(
                "Number of Frames cannot be read and the pixel data is no whole number of frames")
    expected = (per_frame_bits * frames + 7) // 8
    if length < expected:
        raise InvalidInstance(
            f"the pixel data is too short: {length} of {expected} bytes (Rows x Columns x "
            "Samples per Pixel x Bits Allocated x Number of Frames)")
    return frames
