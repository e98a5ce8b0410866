"""Damaged and odd DICOM files for the ingest tests and the fuzz corpus, built with pydicom
and then broken byte by byte. ``damaged_files`` must be refused; ``odd_but_storable`` must be
stored as received (values that do not fit their VR are not a structural failure)."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless, RLELossless

from tests.factory import ct_series


def _bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def with_syntax(data: bytes, syntax: str) -> bytes:
    """``data`` with another Transfer Syntax UID in its file meta, the data set untouched."""
    (group_length,) = struct.unpack_from("<I", data, 140)
    meta = dcmread(BytesIO(data), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = syntax
    del meta.FileMetaInformationGroupLength
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta)
    return data[:132] + out.getvalue() + data[144 + group_length:]


def nested_sequences(data: bytes, depth: int) -> bytes:
    """``data`` (explicit VR little endian) with ``depth`` sequences nested in each other."""
    body = struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 2) + b"X "
    for _ in range(depth):
        body = (struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
                + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + body
                + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    marker = data.find(b"\x10\x00\x10\x00PN")  # before Patient's Name: tag order is kept
    return data[:marker] + body + data[marker:]


def small_ct(folder: Path, **extra: object) -> Dataset:
    """A valid 16 x 16 CT slice as a data set."""
    return dcmread(ct_series(folder, count=1, size=16, **extra)[0])


def _encapsulated(ds: Dataset, frames: list[bytes], syntax: str, offsets: bool) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate(frames, has_bot=offsets)
    ds["PixelData"].VR = "OB"
    ds.NumberOfFrames = len(frames)
    return _bytes(ds)


def damaged_files(folder: Path) -> dict[str, bytes]:
    """Files whose structure or pixel description is damaged, by name; each must be refused
    with a reason."""
    folder.mkdir(parents=True, exist_ok=True)
    good = _bytes(small_ct(folder / "src"))
    cases: dict[str, bytes] = {"nested-500": nested_sequences(good, 500)}
    # A VR overwritten with garbage in the middle of the data set (Study Description).
    at = good.find(b"\x08\x00\x30\x10LO")
    cases["corrupted-vr"] = good[:at + 4] + b"\x00\x07" + good[at + 6:]
    # An element length that runs past the end of the file (Patient's Name).
    at = good.find(b"\x10\x00\x10\x00PN")
    cases["length-past-end"] = good[:at + 6] + b"\xf0\xff" + good[at + 8:]
    cases["ends-inside-a-header"] = good[:good.find(b"\x20\x00\x0d\x00UI") + 5]
    ds = small_ct(folder / "src")
    del ds.Columns
    cases["missing-columns"] = _bytes(ds)
    ds = small_ct(folder / "src")
    ds.Rows, ds.Columns = 100, 150  # 30,000 bytes due
    ds.PixelData = bytes(680)
    cases["short-pixel-data"] = _bytes(ds)
    ds = small_ct(folder / "src")
    ds.NumberOfFrames = 3
    cases["fewer-frames-than-declared"] = _bytes(ds)
    rows = b"\x28\x00\x10\x00US\x02\x00\x10\x00"
    cases["unreadable-rows"] = good.replace(rows, rows[:6] + b"\x01\x00\x10")  # 1-byte US
    at = good.find(b"\xe0\x7f\x10\x00OW")
    cases["native-syntax-encapsulated-data"] = (
        good[:at] + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"
        + encapsulate([bytes(512)]) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    frame = _rle_frame(folder)
    ds = small_ct(folder / "src")
    data = _encapsulated(ds, [frame, frame], RLELossless, offsets=True)
    # The offset table claims 3 frames while Number of Frames says 2.
    bot = data.find(b"\xfe\xff\x00\xe0\x08\x00\x00\x00")
    cases["offset-table-disagrees"] = (data[:bot] + b"\xfe\xff\x00\xe0\x0c\x00\x00\x00"
                                       + data[bot + 8:bot + 16] + struct.pack("<I", 9999)
                                       + data[bot + 16:])
    ds = small_ct(folder / "src")
    data = _encapsulated(ds, [frame], RLELossless, offsets=False)
    cases["more-frames-than-fragments"] = data.replace(
        b"\x28\x00\x08\x00IS\x02\x001 ", b"\x28\x00\x08\x00IS\x02\x005 ")
    cases["compressed-syntax-native-data"] = with_syntax(good, JPEG2000Lossless)
    at = good.find(b"\x10\x00\x10\x00PN")
    cases["stray-item-delimiter"] = (good[:at] + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                                     + good[at:])
    cases["truncated"] = good[: len(good) - 100]
    return cases


def _rle_frame(folder: Path) -> bytes:
    ds = small_ct(folder / "src")
    ds.compress(RLELossless, np.zeros((16, 16), dtype=np.uint16), encoding_plugin="pydicom")
    from pydicom.encaps import generate_frames

    return next(generate_frames(ds.PixelData, number_of_frames=1))


def odd_but_storable(folder: Path) -> dict[str, bytes]:
    """Files with values that do not fit their VR outside the required UIDs and the pixel
    description, by name; each must be stored as received and indexed where it can be."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, bytes] = {}
    ds = small_ct(folder / "src", patient_id="ODD1")
    data = _bytes(ds)
    # Instance Number "1A" (IS) and a birth date that is no date (DA), written raw.
    ds.InstanceNumber = 7
    ds.PatientBirthDate = "19700101"
    data = _bytes(ds).replace(b"\x20\x00\x13\x00IS\x02\x007 ", b"\x20\x00\x13\x00IS\x02\x001A")
    data = data.replace(b"19700101", b"19701345")
    cases["bad-is-and-da"] = data
    ds = small_ct(folder / "src", patient_id="ODD2")
    ds.SliceThickness = "1.0"
    data = _bytes(ds).replace(b"\x18\x00\x50\x00DS\x04\x001.0 ", b"\x18\x00\x50\x00DS\x04\x00abc ")
    cases["bad-ds"] = data
    return cases
