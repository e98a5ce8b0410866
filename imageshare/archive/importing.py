"""Importing files, folders, zip files and CD/DVD media (DICOMDIR) through the one pipeline."""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from pydicom import dcmread

from imageshare.archive.ingest import IngestService
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConflictingInstance, InvalidInstance

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class ImportReport:
    """What an import did: counts and every refusal with its reason."""

    stored: int = 0
    duplicates: int = 0
    kept_first: int = 0
    replaced: int = 0
    held: int = 0
    skipped: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{self.stored} stored, {self.duplicates} duplicates, {self.kept_first} kept "
            f"(different content, stored copy kept), {self.replaced} replaced, "
            + (f"{self.held} held for reconciliation (patient details differ), "
               if self.held else "")
            + f"{len(self.refused)} refused, {self.skipped} skipped (not DICOM); "
            f"{len(self.studies)} studies"
        )


@dataclass(frozen=True)
class Candidate:
    """A file to import: a label for reports and how to open it."""

    label: str
    open: Callable[[], BinaryIO]
    explicit: bool = False


def _is_part10(stream: BinaryIO) -> bool:
    head = stream.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicomdir_files(path: Path) -> list[Path] | None:
    try:
        ds = dcmread(path)
    except Exception:  # noqa: BLE001 - an unreadable DICOMDIR: fall back to walking
        return None
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) != _MEDIA_DIRECTORY:
        return None
    root = path.parent
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(p) for p in (ref if isinstance(ref, list | tuple) or
                                  type(ref).__name__ == "MultiValue" else [ref])]
        files.append(_resolve_case_insensitive(root, parts))
    return files


def _resolve_case_insensitive(root: Path, parts: list[str]) -> Path:
    current = root
    for part in parts:
        candidate = current / part
        if not candidate.exists() and current.is_dir():
            matches = [p for p in current.iterdir() if p.name.lower() == part.lower()]
            candidate = matches[0] if matches else candidate
        current = candidate
    return current


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and ":" not in path.parts[0]


class DicomInputs:
    """Walks files, folders, zip files and DICOMDIR media, yielding every file they hold."""

    def __init__(self) -> None:
        self._open_zips: list[zipfile.ZipFile] = []

    def close(self) -> None:
        """Close the zip files opened while walking."""
        for archive in self._open_zips:
            archive.close()
        self._open_zips.clear()

    def candidates(self, inputs: list[Path], report: ImportReport) -> Iterator[Candidate]:
        """Every file the inputs hold, zip members and DICOMDIR references included."""
        for item in inputs:
            if item.is_dir():
                yield from self._folder(item, report)
            elif item.is_file() and zipfile.is_zipfile(item):
                yield from self._zip(item, report)
            elif item.is_file():
                if item.name.upper() == "DICOMDIR" and _dicomdir_files(item) is not None:
                    yield from self._folder(item.parent, report)
                else:
                    yield Candidate(str(item), lambda p=item: open(p, "rb"), explicit=True)
            else:
                report.refused.append((str(item), "no such file or folder"))

    def _folder(self, folder: Path, report: ImportReport) -> Iterator[Candidate]:
        dicomdir = next(
            (p for p in folder.iterdir() if p.name.upper() == "DICOMDIR" and p.is_file()), None
        )
        listed = _dicomdir_files(dicomdir) if dicomdir else None
        if listed is not None:
            for path in listed:
                if path.is_file():
                    yield Candidate(str(path), lambda p=path: open(p, "rb"), explicit=True)
                else:
                    report.refused.append((str(path), "listed in DICOMDIR but missing"))
            return
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                path = Path(root) / name
                if zipfile.is_zipfile(path):
                    yield from self._zip(path, report)
                else:
                    yield Candidate(str(path), lambda p=path: open(p, "rb"))

    def _zip(self, path: Path, report: ImportReport) -> Iterator[Candidate]:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            report.refused.append((str(path), f"unreadable zip file ({exc.__class__.__name__})"))
            return
        self._open_zips.append(archive)  # members are read by other threads; run() closes it
        for info in archive.infolist():
            label = f"{path}!{info.filename}"
            if info.is_dir():
                continue
            if not _safe_member(info.filename):
                report.refused.append((label, "unsafe path in zip file (refused)"))
                continue
            if info.flag_bits & 0x1:
                report.refused.append((label, "encrypted zip member"))
                continue
            if PurePosixPath(info.filename).name.upper() == "DICOMDIR":
                report.skipped += 1
                continue
            yield Candidate(label, lambda a=archive, i=info: a.open(i))


class Importer(DicomInputs):
    """Walks inputs and feeds every DICOM file to the ingest pipeline."""

    def __init__(self, ingest: IngestService) -> None:
        super().__init__()
        self.ingest = ingest

    def run(
        self, inputs: list[Path], actor: Actor,
        progress: Callable[[str], None] | None = None, parallel: int = 4,
    ) -> ImportReport:
        """Import everything under ``inputs``; never stops on one bad file.

        ``parallel`` files are stored at once (their index writes share commits).
        """
        report = ImportReport()
        lock = threading.Lock()

        def one(candidate: Candidate) -> None:
            outcome = self._one(candidate, actor)
            with lock:
                outcome(report)
                if progress:
                    progress(candidate.label)

        walk = self.candidates(inputs, report)
        try:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                window: list[Future[None]] = []
                while True:
                    with lock:  # the walk records refusals in the report too
                        candidate = next(walk, None)
                    if candidate is None:
                        break
                    window.append(pool.submit(one, candidate))
                    if len(window) >= 4 * parallel:  # bounded: memory stays flat
                        window.pop(0).result()
                for future in window:
                    future.result()
        finally:
            while self._open_zips:
                self._open_zips.pop().close()
        return report

    def _one(self, candidate: Candidate, actor: Actor) -> Callable[[ImportReport], None]:
        """Store one file; returns how to count it in the report."""
        try:
            return self._store(candidate, actor)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops an import
            reason = f"unexpected error ({type(exc).__name__})"
            return lambda report: report.refused.append((candidate.label, reason))

    def _store(self, candidate: Candidate, actor: Actor) -> Callable[[ImportReport], None]:
        label = candidate.label

        def refuse(reason: str) -> Callable[[ImportReport], None]:
            return lambda report: report.refused.append((label, reason))

        def skip(report: ImportReport) -> None:
            report.skipped += 1

        try:
            with candidate.open() as stream:
                if not _is_part10(stream):
                    if candidate.explicit:
                        return refuse("not a DICOM Part 10 file (no 'DICM' prefix)")
                    return skip
            with candidate.open() as stream:
                header_check = dcmread(stream, stop_before_pixels=True,
                                       specific_tags=["SOPClassUID"])
            if str(header_check.get("SOPClassUID", "")) == _MEDIA_DIRECTORY:
                return skip
        except Exception:  # noqa: BLE001 - the pipeline gives the precise reason below
            pass
        try:
            with candidate.open() as stream:
                result = self.ingest.store_stream(stream, actor)
        except (InvalidInstance, ConflictingInstance) as exc:
            return refuse(str(exc))
        except OSError as exc:
            return refuse(f"cannot read ({exc.strerror or exc})")

        def count(report: ImportReport) -> None:
            report.studies.add(result.study_uid)
            if result.outcome == "stored":
                report.stored += 1
            elif result.outcome == "held":
                report.held += 1
            elif result.outcome == "duplicate":
                report.duplicates += 1
            elif result.outcome == "kept_first":
                report.kept_first += 1
            else:
                report.replaced += 1

        return count
