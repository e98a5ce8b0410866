"""Writers of exported instances. Names inside an export are counters (S0001/SE0001/IM000001),
never patient data. Instances arrive as verified staging files (written next to the output,
so that a folder export only renames them) or as data sets."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO

from pydicom import Dataset, dcmread
from pydicom.fileset import FileSet
from pydicom.uid import (
    JPEG2000,
    MPEG2MPHL,
    MPEG2MPML,
    MPEG4HP41,
    MPEG4HP41BD,
    MPEG4HP42STEREO,
    MPEG4HP422D,
    MPEG4HP423D,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
)

from imageshare.archive.transcode import convert_dataset, is_video
from imageshare.domain.errors import ImageShareError

# Transfer syntaxes of the General Purpose media profiles (PS3.11 Annex D: STD-GEN-CD/DVD-RAM
# takes Explicit VR Little Endian only; the DVD, BD and USB profiles add JPEG, JPEG 2000 and
# MPEG-2/MPEG-4 video). Anything else (Implicit VR, big endian, deflated, RLE, JPEG-LS) is
# written to the media as Explicit VR Little Endian.
MEDIA_SYNTAXES = frozenset({
    ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEG2000Lossless, JPEG2000, MPEG2MPML, MPEG2MPHL, MPEG4HP41, MPEG4HP41BD, MPEG4HP422D,
    MPEG4HP423D, MPEG4HP42STEREO,
})


class Numbering:
    """Study, series and instance counters keyed by UID."""

    def __init__(self) -> None:
        self._studies: dict[str, int] = {}
        self._series: dict[str, tuple[int, int]] = {}
        self._instances: dict[str, int] = {}

    def name(self, ds: Dataset) -> str:
        """The next name for an instance of ``ds``'s study and series."""
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

    def staging(self) -> Path:
        """A hidden folder inside the output (removed when the run ends)."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder))

    def prepare(self, ds: Dataset) -> None:
        """Nothing to add."""

    def add_staged(self, path: Path, ds: Dataset) -> str:
        """Move the staging file into place; returns its relative path."""
        name = self._names.name(ds)
        target = self.folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return name

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
            self._zip.setpassword(password.encode())
        else:
            self._zip = zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED)
        self._names = Numbering()

    def staging(self) -> Path:
        """A staging folder next to the zip file."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.path.parent))

    def prepare(self, ds: Dataset) -> None:
        """Nothing to add."""

    def add_staged(self, path: Path, ds: Dataset) -> str:
        """Add the staging file ``path`` as the next instance; returns its name in the zip."""
        name = self._names.name(ds)
        with open(path, "rb") as source, self._zip.open(name, "w", force_zip64=True) as out:
            shutil.copyfileobj(source, out, 1 << 20)
        return name

    def add(self, ds: Dataset) -> str:
        """Add one instance; returns its name in the zip."""
        name = self._names.name(ds)
        self._zip.writestr(name, _part10(ds))
        return name

    def add_stream(self, header: Dataset, stream: BinaryIO) -> str:
        """Add the Part 10 bytes of ``stream`` (from where it is) unchanged as the next
        instance of ``header``'s study and series, streamed; returns its name in the zip."""
        name = self._names.name(header)
        with self._zip.open(name, "w", force_zip64=True) as out:
            shutil.copyfileobj(stream, out, 1 << 20)
        return name

    def add_file(self, name: str, data: bytes) -> None:
        """Add another file (a report, a video) under ``name``."""
        self._zip.writestr(name, data)

    def add_path(self, name: str, path: Path) -> None:
        """Add the file at ``path`` under ``name``, streamed (never whole in memory)."""
        with open(path, "rb") as source, self._zip.open(name, "w", force_zip64=True) as out:
            shutil.copyfileobj(source, out, 1 << 20)

    def close(self) -> None:
        """Finish the zip."""
        self._zip.close()


_DICOMDIR_KEYS = (("StudyDate", "19000101"), ("StudyTime", "000000"),
                  ("PatientID", "ANONYMOUS"), ("StudyID", "1"), ("Modality", "OT"),
                  ("SeriesNumber", 1))


class DicomdirWriter:
    """A PS3.10 file-set (general-purpose media profile): a DICOMDIR and 8-character file IDs,
    readable by viewers shipped on CDs and by PACS importers. Every file on the media is in a
    transfer syntax of the General Purpose profiles (:data:`MEDIA_SYNTAXES`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._fileset = FileSet()
        # pydicom stages every added instance in a folder of its own, by default in the
        # system's temporary folder: keep those copies of patient data inside the output (the
        # service's private data folder, on the same disk) instead; removed when closed.
        self._staging = tempfile.TemporaryDirectory(prefix=".dicomdir-", dir=folder)
        stage = getattr(self._fileset, "_stage", None)
        if isinstance(stage, dict) and "t" in stage:
            stage["t"].cleanup()
            stage["t"], stage["path"] = self._staging, Path(self._staging.name)
        self._count = 0

    def staging(self) -> Path:
        """A staging folder next to the file-set."""
        return Path(tempfile.mkdtemp(prefix=".staging-", dir=self.folder))

    def prepare(self, ds: Dataset) -> None:
        """The keys every DICOMDIR record needs (dummies where the profile emptied them)."""
        for keyword, value in (*_DICOMDIR_KEYS, ("InstanceNumber", self._count + 1)):
            if keyword not in ds or ds.get(keyword) in (None, ""):
                setattr(ds, keyword, value)

    def add_staged(self, path: Path, ds: Dataset) -> str:
        """Add the staging file ``path`` (prepared) to the file-set; the file is removed."""
        try:
            return self._added(dcmread(path))
        finally:
            path.unlink(missing_ok=True)

    def add(self, ds: Dataset) -> str:
        """Add one instance to the file-set."""
        self.prepare(ds)
        return self._added(ds)

    def _added(self, ds: Dataset) -> str:
        self._count += 1
        instance = self._fileset.add(in_media_syntax(ds))
        return "/".join(instance.FileID.split("\\")) if hasattr(instance, "FileID") else ""

    def close(self) -> None:
        """Write the DICOMDIR and the files."""
        try:
            if self._count:
                self._fileset.write(self.folder)
        finally:
            self._staging.cleanup()


def in_media_syntax(ds: Dataset) -> Dataset:
    """``ds`` (read from a Part 10 file) in Explicit VR Little Endian unless its transfer
    syntax is one the General Purpose media profiles permit (values unchanged; compressed
    pixel data decoded within the pixel budget). Video in a syntax no profile permits stays
    as it is (it cannot be decoded here); any other failure is an ImageShareError."""
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") if meta is not None else "")
    if syntax in MEDIA_SYNTAXES or (syntax and is_video(syntax)):
        return ds
    if not syntax:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds
    try:
        return convert_dataset(ds, ExplicitVRLittleEndian)
    except ImageShareError:
        raise
    except Exception as exc:  # noqa: BLE001 - codec plugins raise many kinds
        raise ImageShareError("an instance could not be written in a transfer syntax of the "
                              "DICOM media profiles; nothing was exported") from exc
