"""Files and requests that are too big on purpose: decompression bombs and the like."""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid


def _rle_plane(rows: int, columns: int, value: int = 100) -> bytes:
    """One RLE segment of a constant plane: 128-byte runs, each row encoded on its own."""
    full, rest = divmod(columns, 128)
    row = bytes([0x81, value]) * full  # -127: the next byte 128 times
    if rest:
        row += bytes([(257 - rest) & 0xFF, value])
    return row * rows


def rle_bomb(path: Path, rows: int, columns: int, frames: int = 1, real: bool = True,
             patient_id: str = "BOMB1") -> Path:
    """A small RLE Lossless file whose header claims ``rows`` x ``columns`` 8-bit pixels per
    frame. With ``real`` the RLE data decodes to exactly that (a constant grey plane: about
    2.2 MB for 12000 x 12000); without, a token fragment stands in (never meant to decode)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = RLELossless
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "Bomb^Test"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if real:
        segment = _rle_plane(rows, columns)
        header = struct.pack("<16I", 1, 64, *([0] * 14))
        frame = header + segment + (b"\0" if len(segment) % 2 else b"")
    else:
        frame = struct.pack("<16I", 1, 64, *([0] * 14)) + bytes([0x81, 100])
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
