"""De-identifying instances: attributes (PS3.15 profile) and burned-in text, with a report.

:class:`Deidentifier` turns one data set into its de-identified copy or holds it back;
:func:`deidentify_inputs` runs it over files, folders, zips and DICOMDIR media into an export
writer, with progress, a summary and a JSON report of what was done to each file.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from imageshare.archive.importing import DicomInputs, ImportReport
from imageshare.deid.engine import AttributeCleaner
from imageshare.deid.pixels import BurnedInTextCleaner, PixelReport, may_have_burned_in_text
from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms

# Safe private attributes (PS3.15 E.3.10): (private creator, group, element offset).
SAFE_PRIVATE: frozenset[tuple[str, int, int]] = frozenset({
    ("SIEMENS MR HEADER", 0x0019, 0x0C), ("SIEMENS MR HEADER", 0x0019, 0x0D),
    ("SIEMENS MR HEADER", 0x0019, 0x0E), ("SIEMENS MR HEADER", 0x0019, 0x27),
    ("GEMS_PARM_01", 0x0043, 0x39), ("GEMS_ACQU_01", 0x0019, 0x9E),
    ("Philips MR Imaging DD 001", 0x2001, 0x03), ("Philips MR Imaging DD 001", 0x2005, 0x0E),
})


@dataclass
class Outcome:
    """One instance after de-identification: its data set, or None when held back."""

    dataset: Dataset | None
    report: dict[str, Any]

    @property
    def held_back(self) -> bool:
        """True when the instance must not leave (identifiers may remain in its pixels)."""
        return self.dataset is None


class Deidentifier:
    """Applies a profile to instances: attributes first worked out on the original identity,
    pixels checked and cleaned, then attributes replaced."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms,
                 pixels: BurnedInTextCleaner | None = None) -> None:
        self.profile = profile
        self.attributes = AttributeCleaner(profile, pseudonyms, SAFE_PRIVATE)
        self.pixels = pixels or BurnedInTextCleaner()

    def instance(self, ds: Dataset) -> Outcome:
        """De-identify ``ds`` in place; the outcome holds it back if its pixels may still show
        the patient."""
        context = self.attributes.context(ds)
        pixel_report = PixelReport()
        if "EncapsulatedDocument" in ds:
            pixel_report.held_back = True
            pixel_report.reason = ("encapsulated documents (PDF, CDA, ...) cannot be "
                                   "de-identified automatically")
        elif may_have_burned_in_text(ds):
            if self.profile.has("clean_pixel_data"):
                pixel_report = self.pixels.clean(ds, context.identifiers)
            else:
                pixel_report.held_back = True
                pixel_report.reason = ("the image may carry burned-in text and the profile "
                                       "does not clean pixel data")
        attributes = self.attributes.apply(ds, context)
        report = {"attributes": attributes.as_dict(), "pixels": pixel_report.as_dict(),
                  "sop_class_uid": str(ds.get("SOPClassUID", "")),
                  "new_sop_instance_uid": str(ds.get("SOPInstanceUID", ""))}
        if pixel_report.held_back:
            return Outcome(None, {**report, "held_back": True,
                                  "reason": pixel_report.reason})
        return Outcome(ds, {**report, "held_back": False})


class ExportWriter(Protocol):
    """Where de-identified (or identifiable) instances go: a folder, a zip, DICOMDIR media."""

    def add(self, ds: Dataset) -> str:
        """Write ``ds``; returns its name in the export (never patient data)."""
        ...

    def close(self) -> None:
        """Finish the export (write DICOMDIR, close the zip)."""
        ...


@dataclass
class DeidentificationReport:
    """Everything a de-identification run did."""

    profile: str
    files: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    held_back: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bytes_in: int = 0

    def summary(self) -> str:
        """One line for people."""
        return (f"{self.written} written, {self.held_back} held back for review, "
                f"{self.failed} failed, {self.skipped} skipped (not DICOM) "
                f"with profile {self.profile} in {self.seconds:.1f} s")

    def as_dict(self, with_inputs: bool) -> dict[str, Any]:
        """The report; without ``with_inputs`` input paths are replaced by their hashes (file
        names can hold patient names)."""
        files = []
        for entry in self.files:
            item = dict(entry)
            if not with_inputs:
                item["input"] = hashlib.sha256(str(item["input"]).encode()).hexdigest()[:16]
            files.append(item)
        return {"profile": self.profile, "written": self.written, "held_back": self.held_back,
                "failed": self.failed, "skipped": self.skipped, "seconds": self.seconds,
                "files": files}

    def write(self, path: Path, with_inputs: bool) -> None:
        """Save the report as JSON."""
        path.write_text(json.dumps(self.as_dict(with_inputs), indent=2, default=str))


def deidentify_inputs(
    inputs: list[Path], deidentifier: Deidentifier, writer: ExportWriter,
    progress: Callable[[int], None] | None = None,
) -> DeidentificationReport:
    """De-identify every DICOM file the inputs hold into ``writer``."""
    report = DeidentificationReport(deidentifier.profile.name)
    walk = ImportReport()
    walker = DicomInputs()
    started = time.monotonic()
    try:
        for candidate in walker.candidates(inputs, walk):
            try:
                with candidate.open() as stream:
                    data = stream.read()
                ds = dcmread(io.BytesIO(data))
                if "SOPInstanceUID" not in ds:
                    raise InvalidDicomError("no SOP Instance UID")
            except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
                if candidate.explicit:
                    report.failed += 1
                    report.files.append({"input": candidate.label, "error":
                                         f"not a readable DICOM file ({type(exc).__name__})"})
                else:
                    report.skipped += 1
                if progress:
                    progress(1)
                continue
            report.bytes_in += len(data)
            try:
                outcome = deidentifier.instance(ds)
            except Exception as exc:  # noqa: BLE001 - reported per file; never written
                report.failed += 1
                report.files.append({"input": candidate.label,
                                     "error": f"could not be de-identified "
                                              f"({type(exc).__name__})"})
                if progress:
                    progress(1)
                continue
            entry = {"input": candidate.label, **outcome.report}
            if outcome.held_back:
                report.held_back += 1
            else:
                entry["output"] = writer.add(outcome.dataset)  # type: ignore[arg-type]
                report.written += 1
            report.files.append(entry)
            if progress:
                progress(1)
        for label, reason in walk.refused:
            report.failed += 1
            report.files.append({"input": label, "error": reason})
        report.skipped += walk.skipped
    finally:
        walker.close()
        writer.close()
        report.seconds = round(time.monotonic() - started, 3)
    return report
