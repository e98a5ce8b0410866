"""Builds real DICOM files for tests and benchmarks with pydicom."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)


def _base(
    sop_class: str, patient_id: str, patient_name: str, study_uid: str, series_uid: str,
    modality: str, **extra: object,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC001"
    ds.StudyID = "1"
    ds.StudyDescription = "Test study"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.Manufacturer = "ImageShare tests"
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def ct_series(
    folder: Path, count: int = 4, size: int = 64, patient_id: str = "PAT001",
    patient_name: str = "Doe^Jane", study_uid: str | None = None, **extra: object,
) -> list[Path]:
    """Write ``count`` CT slices of ``size`` x ``size`` 16-bit pixels; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_of_reference = generate_uid()
    rng = np.random.default_rng(count * size)
    paths = []
    for i in range(count):
        ds = _base(CTImageStorage, patient_id, patient_name, study_uid, series_uid, "CT", **extra)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0, 0, float(i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1.0
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16)
        pixels[: size // 4, :] = 1024 + i  # a band whose value we know
        ds.PixelData = pixels.tobytes()
        path = folder / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def us_cine(
    folder: Path, frames: int = 60, rows: int = 120, cols: int = 160,
    patient_id: str = "PAT002", patient_name: str = "Smith^John", study_uid: str | None = None,
) -> Path:
    """Write one multi-frame ultrasound RGB cine loop at 30 frames/s."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base(
        UltrasoundMultiFrameImageStorage, patient_id, patient_name,
        study_uid or generate_uid(), generate_uid(), "US",
    )
    ds.InstanceNumber = 1
    ds.NumberOfFrames = frames
    ds.FrameTime = 33.3
    ds.CineRate = 30
    ds.FrameIncrementPointer = 0x00181063
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    data = np.zeros((frames, rows, cols, 3), dtype=np.uint8)
    for f in range(frames):
        data[f, :, :, 0] = f * 4
        data[f, 10:20, (f * 2) % cols, 1] = 255
    ds.PixelData = data.tobytes()
    path = folder / f"us-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def broken_files(tmp_path: Path) -> dict[str, Path]:
    """Broken DICOM files, each with a different fault, by name."""
    good = ct_series(tmp_path / "good", count=1)[0]
    data = good.read_bytes()
    files: dict[str, Path] = {}

    def put(name: str, content: bytes) -> None:
        files[name] = tmp_path / f"{name}.dcm"
        files[name].write_bytes(content)

    put("truncated", data[: len(data) - 500])
    put("no-preamble", data[128:])
    put("garbage", bytes(range(256)) * 40)
    put("empty", b"")
    ds = dcmread(good)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no-uid.dcm", enforce_file_format=False)
    files["no-uid"] = tmp_path / "no-uid.dcm"
    ds = dcmread(good)
    ds.StudyInstanceUID = "not.a.uid!"
    ds.save_as(tmp_path / "bad-uid.dcm")
    files["bad-uid"] = tmp_path / "bad-uid.dcm"
    # An element whose length runs far past the end of the file.
    marker = data.find(b"\x10\x00\x10\x00PN")
    absurd = bytearray(data)
    absurd[marker + 6: marker + 8] = b"\xff\xff"
    put("absurd-length", bytes(absurd[: marker + 200]))
    frag = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    put("truncated-encapsulated", frag[: len(frag) - 3000])
    return files


def ct_header(name: str, patient_id: str, birth_date: str, study_date: str,
              charset: str = "ISO_IR 192") -> Dataset:
    """A CT header of one patient (no pixel data), as a Part 10 data set with fresh UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.StudyDate = ds.SeriesDate = study_date
    return ds
