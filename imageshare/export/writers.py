"""Writers of exported instances. Names inside an export are counters (S0001/SE0001/IM000001),
never patient data."""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

from pydicom import Dataset
from pydicom.fileset import FileSet

from imageshare.domain.errors import ImageShareError


class Numbering:
    """Study, series and instance counters keyed by UID."""

    def __init__(self) -> None:
        self._studies: dict[str, int] = {}
        self._series: dict[str, tuple[int, int]] = {}
        self._instances: dict[str, int] = {}

    def name(self, ds: Dataset) -> str:
        study = str(ds.get("StudyInstanceUID", ""))
        series = str(ds.get("SeriesInstanceUID", ""))
        s = self._studies.setdefault(study, len(self._studies) + 1)
        if series not in self._series:
            count = sum(1 for v in self._series.values() if v[0] == s)
            self._series[series] = (s, count + 1)
        se = self._series[series][1]
        n = self._instances[series] = self._instances.get(series, 0) + 1
        return f"S{s:04d}/SE{se:04d}/IM{n:06d}.dcm"


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class FolderWriter:
    """Instances as files in a folder tree."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._names = Numbering()

    def add(self, ds: Dataset) -> str:
        """Write one instance; returns its relative path."""
        name = self._names.name(ds)
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_part10(ds))
        return name

    def close(self) -> None:
        """Nothing to finish."""


class ZipWriter:
    """Instances in a ZIP file; with a password, AES-256 encrypted (WinZip AE-2, opened by
    7-Zip, WinZip, macOS Archive Utility and most tools for removable media)."""

    def __init__(self, path: Path, password: str = "") -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if password:
            import pyzipper

            if len(password) < 8:
                raise ImageShareError("an export password needs at least 8 characters")
            self._zip: zipfile.ZipFile = pyzipper.AESZipFile(
                path, "w", compression=pyzipper.ZIP_DEFLATED, encryption=pyzipper.WZ_AES)
            self._zip.setpassword(password.encode())  # type: ignore[attr-defined]
        else:
            self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self._names = Numbering()

    def add(self, ds: Dataset) -> str:
        """Add one instance; returns its name in the zip."""
        name = self._names.name(ds)
        self._zip.writestr(name, _part10(ds))
        return name

    def add_file(self, name: str, data: bytes) -> None:
        """Add another file (a report, a video) under ``name``."""
        self._zip.writestr(name, data)

    def close(self) -> None:
        """Finish the zip."""
        self._zip.close()


class DicomdirWriter:
    """A PS3.10 file-set (general-purpose media profile): a DICOMDIR and 8-character file IDs,
    readable by viewers shipped on CDs and by PACS importers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fileset = FileSet()
        self._staging = tempfile.TemporaryDirectory(prefix="dicomdir-")
        self._count = 0

    def add(self, ds: Dataset) -> str:
        """Add one instance to the file-set."""
        for keyword, value in (("StudyDate", "19000101"), ("StudyTime", "000000"),
                               ("PatientID", "ANONYMOUS"), ("StudyID", "1"),
                               ("Modality", "OT"), ("SeriesNumber", 1),
                               ("InstanceNumber", self._count + 1)):
            if keyword not in ds or ds.get(keyword) in (None, ""):
                setattr(ds, keyword, value)
        self._count += 1
        path = Path(self._staging.name) / f"{self._count}.dcm"
        path.write_bytes(_part10(ds))
        instance = self._fileset.add(str(path))
        return "/".join(instance.FileID.split("\\")) if hasattr(instance, "FileID") else ""

    def close(self) -> None:
        """Write the DICOMDIR and the files."""
        try:
            if self._count:
                self._fileset.write(self.folder)
        finally:
            self._staging.cleanup()
