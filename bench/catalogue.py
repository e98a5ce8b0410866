"""A reproducible archive catalogue for the scale benchmarks: studies, series and instances
with varied patients, names, dates and modalities, as DICOM data sets.

Study ``s`` (0, 1, 2, ...) always has the same patient, UIDs, date and modality, so that a
bulk-loaded index of a million instances and a smaller set of real files sent to a peer hold
the same data for the studies they share. Used by ``bench/qido_scale.py``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.8.498.7717"  # pydicom's root, then this benchmark's arc

SURNAMES = (
    "Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Robinson",
    "Wright", "Thompson", "Evans", "Walker", "White", "Roberts", "Green", "Hall", "Wood",
    "Jackson", "Clarke", "Patel", "Khan", "Lewis", "James", "Phillips", "Mason", "Mitchell",
    "Rose", "Davis", "Rodriguez", "Cox", "Alexander", "Morgan", "Moore", "Mills", "King",
    "Martin", "Scott", "Turner", "Hill", "Harris", "Cooper", "Ward", "Morris", "Baker",
    "Murphy", "Bell", "Adams", "Allen", "Young", "Edwards", "Campbell", "Anderson", "Smithers",
    "Muller", "Schmidt", "Garcia", "Martinez", "Nguyen", "Kowalski", "Novak", "Okafor",
    "Singh", "Begum", "Ali", "Hussain", "Shah", "Ahmed", "Chen", "Wang", "Li", "Zhang",
    "O'Brien", "McDonald", "Stewart", "Reid", "Murray", "Fraser", "Grant", "Ross",
    "Kelly", "Ryan", "Byrne", "Doyle", "Walsh", "Lynch", "Quinn", "Nolan", "Gallagher",
    "Price", "Howard", "Hughes", "Parker", "Collins", "Carter", "Bennett", "Gray", "Foster",
)
GIVEN = (
    "Oliver", "Amelia", "George", "Isla", "Harry", "Ava", "Noah", "Mia", "Jack", "Ivy",
    "Leo", "Lily", "Arthur", "Isabella", "Muhammad", "Rosie", "Oscar", "Sophia", "Charlie",
    "Grace", "Jacob", "Freya", "Thomas", "Olivia", "Henry", "Emily", "William", "Poppy",
    "James", "Ella", "John", "Mary", "Peter", "Margaret", "David", "Susan", "Michael",
    "Patricia", "Robert", "Elizabeth", "Paul", "Jennifer", "Mark", "Linda", "Andrew",
    "Barbara", "Richard", "Anne", "Stephen", "Sarah",
)
# Modality mix of a general hospital (per 20 studies) with a description and body part.
MODALITY_MIX = (
    ("CT", "CT HEAD", "HEAD"), ("CT", "CT CHEST ABDO PELVIS", "CHEST"),
    ("CT", "CT CHEST", "CHEST"), ("CT", "CT ABDOMEN", "ABDOMEN"),
    ("CT", "CTPA", "CHEST"), ("MR", "MRI BRAIN", "HEAD"), ("MR", "MRI LUMBAR SPINE", "LSPINE"),
    ("MR", "MRI KNEE", "KNEE"), ("MR", "MRI PROSTATE", "PELVIS"), ("US", "US ABDOMEN", "ABDOMEN"),
    ("US", "US OBSTETRIC", "PELVIS"), ("US", "ECHO", "HEART"), ("CR", "XR CHEST", "CHEST"),
    ("CR", "XR HAND", "HAND"), ("DX", "XR KNEE", "KNEE"), ("DX", "XR PELVIS", "PELVIS"),
    ("MG", "MAMMOGRAM", "BREAST"), ("MG", "MAMMOGRAM", "BREAST"), ("NM", "BONE SCAN", "WHOLEBODY"),
    ("PT", "PET CT", "WHOLEBODY"),
)
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1", "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
    "NM": "1.2.840.10008.5.1.4.1.1.20", "PT": "1.2.840.10008.5.1.4.1.1.128",
}
REFERRERS = ("Okoye^Ada^^Dr", "Lindqvist^Per^^Dr", "Barnes^Helen^^Dr", "Fischer^Tom^^Dr")
FIRST_DAY = dt.date(2005, 1, 1)
DAYS = 7670  # 2005-01-01 .. 2025-12-31
PIXELS = 16  # rows and columns of the instances written as files (16x16, 16 bit)


@dataclass(frozen=True)
class Shape:
    """How many series per study and instances per series."""

    series: int = 5
    instances: int = 10

    @property
    def per_study(self) -> int:
        return self.series * self.instances


def patient_of(study: int) -> int:
    """Patient number of a study: about 1.7 studies per patient, neighbours share one."""
    return study * 3 // 5


def patient_id(patient: int) -> str:
    return f"H{patient:08d}"


def patient_name(patient: int) -> str:
    mixed = patient * 2654435761 % 2**32  # Knuth's multiplicative hash: spread the names
    return f"{SURNAMES[mixed % len(SURNAMES)]}^{GIVEN[(mixed >> 8) % len(GIVEN)]}"


def birth_date(patient: int) -> str:
    return (dt.date(1930, 1, 1) + dt.timedelta(days=patient * 7919 % 32000)).strftime("%Y%m%d")


def study_date(study: int) -> str:
    return (FIRST_DAY + dt.timedelta(days=study * 104729 % DAYS)).strftime("%Y%m%d")


def study_uid(study: int) -> str:
    return f"{UID_ROOT}.{study}"


def series_uid(study: int, series: int) -> str:
    return f"{UID_ROOT}.{study}.{series + 1}"


def sop_uid(study: int, series: int, instance: int) -> str:
    return f"{UID_ROOT}.{study}.{series + 1}.{instance + 1}"


def modality_of(study: int) -> tuple[str, str, str]:
    return MODALITY_MIX[study * 7 % len(MODALITY_MIX)]


def instance_dataset(study: int, series: int, instance: int) -> Dataset:
    """Instance ``instance`` of series ``series`` of study ``study``, with 16x16 pixels."""
    patient = patient_of(study)
    modality, description, body_part = modality_of(study)
    sop_class = SOP_CLASS[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid(study, series, instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id(patient)
    ds.PatientName = patient_name(patient)
    ds.PatientBirthDate = birth_date(patient)
    ds.PatientSex = "MF"[patient % 2]
    ds.StudyInstanceUID = study_uid(study)
    ds.SeriesInstanceUID = series_uid(study, series)
    ds.StudyDate = study_date(study)
    ds.StudyTime = f"{8 + study % 10:02d}{study % 60:02d}00"
    ds.AccessionNumber = f"RX{study:08d}"
    ds.StudyID = str(study % 100000)
    ds.StudyDescription = description
    ds.ReferringPhysicianName = REFERRERS[study % len(REFERRERS)]
    ds.Modality = modality
    ds.SeriesNumber = series + 1
    ds.SeriesDescription = f"{description} {series + 1}"
    ds.BodyPartExamined = body_part
    ds.Manufacturer = "ImageShare bench"
    ds.InstanceNumber = instance + 1
    ds.Rows = ds.Columns = PIXELS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(range(256)) * (PIXELS * PIXELS * 2 // 256)
    return ds


def write_study(folder: Path, study: int, shape: Shape) -> list[Path]:
    """Write every instance of ``study`` as a DICOM file under ``folder``."""
    target = folder / f"{study:07d}"
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(shape.series):
        for i in range(shape.instances):
            path = target / f"{k}-{i}.dcm"
            instance_dataset(study, k, i).save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths
