"""Burned-in text in pixels: blank the known regions, read what is left with OCR (Tesseract),
blank words that match the patient, read again, and hold the instance back if the patient can
still be read. Pixels are decoded and written back uncompressed (lossless)."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset

from imageshare.archive.pixel_budget import decoding
from imageshare.domain.errors import ConfigurationError

DEFAULT_REGIONS = Path(__file__).with_name("regions.toml")
# Modalities and SOP classes whose images often carry burned-in text.
BURNED_IN_MODALITIES = {"US", "IVUS", "ES", "XC", "GM", "SC", "OT", "OP", "SM", "DOC", "XA",
                        "RF", "ECG", "IO", "PX", "DX", "CR", "MG"}
_SAMPLE_FRAMES = 3
_MIN_CONFIDENCE = 40.0


@dataclass(frozen=True)
class Region:
    """Boxes to blank on images of matching machines."""

    modality: str = "*"
    manufacturer: str = "*"
    model: str = "*"
    rows: int = 0
    columns: int = 0
    boxes: tuple[tuple[float, float, float, float], ...] = ()

    def matches(self, ds: Dataset) -> bool:
        """True when ``ds`` comes from a machine (and image size) this region is for."""
        def like(pattern: str, value: Any) -> bool:
            return fnmatch.fnmatch(str(value or "").upper(), pattern.upper())

        return (like(self.modality, ds.get("Modality")) and like(self.manufacturer,
                ds.get("Manufacturer")) and like(self.model, ds.get("ManufacturerModelName"))
                and self.rows in (0, int(ds.get("Rows") or 0))
                and self.columns in (0, int(ds.get("Columns") or 0)))


def load_regions(path: Path | None = None) -> list[Region]:
    """The regions of the TOML file at ``path`` (default: the shipped ones)."""
    source = Path(path) if path else DEFAULT_REGIONS
    try:
        data = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read burned-in regions {source}: {exc}") from exc
    regions = []
    for entry in data.get("region", []):
        boxes = tuple(tuple(float(v) for v in box) for box in entry.get("boxes", []))
        if any(len(b) != 4 for b in boxes):
            raise ConfigurationError(f"{source}: a box is [x, y, width, height]")
        regions.append(Region(
            str(entry.get("modality", "*")), str(entry.get("manufacturer", "*")),
            str(entry.get("model", "*")), int(entry.get("rows", 0)),
            int(entry.get("columns", 0)), boxes))  # type: ignore[arg-type]
    return regions


@dataclass
class PixelReport:
    """What the pixel path did to one instance."""

    checked: bool = False
    regions: list[list[int]] = field(default_factory=list)
    ocr_words: int = 0
    identifiers_found: list[dict[str, Any]] = field(default_factory=list)
    blanked_words: int = 0
    frames_read: list[int] = field(default_factory=list)
    held_back: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly; what was found is named by kind and place, never by its text."""
        return {"checked": self.checked, "regions": self.regions, "ocr_words": self.ocr_words,
                "identifiers_found": self.identifiers_found,
                "blanked_words": self.blanked_words, "frames_read": self.frames_read,
                "held_back": self.held_back, "reason": self.reason}


def may_have_burned_in_text(ds: Dataset) -> bool:
    """True when the instance may carry burned-in text: Burned In Annotation YES or absent, or
    a modality known for it."""
    if "PixelData" not in ds:
        return False
    annotation = str(ds.get("BurnedInAnnotation", "") or "").upper()
    return annotation != "NO" or str(ds.get("Modality", "")).upper() in BURNED_IN_MODALITIES


def _to_8bit(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 3:
        frame = frame[..., :3].mean(axis=2)
    frame = frame.astype(np.float64)
    low, high = float(frame.min()), float(frame.max())
    return ((frame - low) * 255.0 / ((high - low) or 1.0)).astype(np.uint8)


def _normalise(text: str) -> str:
    return re.sub(r"[^0-9A-Z]", "", text.upper())


class BurnedInTextCleaner:
    """Blanks regions and identifying words; verifies with OCR."""

    def __init__(self, regions: list[Region] | None = None, ocr: Any = None) -> None:
        self.regions = regions if regions is not None else load_regions()
        self._ocr = ocr

    def _tesseract(self) -> Any:
        if self._ocr is None:
            import pytesseract

            # Tesseract's own threads fight over the cores; one thread each is much faster.
            os.environ.setdefault("OMP_THREAD_LIMIT", "1")
            self._ocr = pytesseract
        return self._ocr

    def boxes_for(self, ds: Dataset) -> list[tuple[int, int, int, int]]:
        """The configured boxes (pixels) for ``ds``'s machine and image size."""
        rows, cols = int(ds.Rows), int(ds.Columns)
        out = []
        for region in self.regions:
            if not region.matches(ds):
                continue
            for x, y, w, h in region.boxes:
                px = [round(v * (cols if i % 2 == 0 else rows)) if v <= 1 else round(v)
                      for i, v in enumerate((x, y, w, h))]
                out.append((px[0], px[1], px[2], px[3]))
        return out

    def read_words(self, frame: np.ndarray) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Words Tesseract reads on a frame, with their boxes in frame pixels."""
        grey = _to_8bit(frame)
        if grey.mean() < 128:  # light text on dark: make it dark on light
            grey = 255 - grey
        image = Image.fromarray(grey).resize((grey.shape[1] * 2, grey.shape[0] * 2),
                                             Image.Resampling.LANCZOS)
        image = image.point(lambda v: 255 if v > 160 else 0)
        ocr = self._tesseract()
        data = ocr.image_to_data(image, config="--psm 11", output_type=ocr.Output.DICT)
        words = []
        for i, text in enumerate(data["text"]):
            if not text.strip():
                continue
            try:
                confidence = float(data["conf"][i])
            except (TypeError, ValueError):
                confidence = 0.0
            if confidence < _MIN_CONFIDENCE:
                continue
            box = (data["left"][i] // 2, data["top"][i] // 2,
                   (data["width"][i] + 1) // 2 + 1, (data["height"][i] + 1) // 2 + 1)
            words.append((text.strip(), box))
        return words

    @staticmethod
    def _matches(word: str, identifiers: tuple[str, ...]) -> str | None:
        norm = _normalise(word)
        if len(norm) < 2:
            return None
        for ident in identifiers:
            target = _normalise(ident)
            if len(target) < 2:
                continue
            if norm == target or (len(target) >= 4 and (target in norm or (
                    len(norm) >= 4 and norm in target))):
                return "date" if target.isdigit() and len(target) == 8 else (
                    "number" if target.isdigit() else "name or identifier")
        return None

    def clean(self, ds: Dataset, identifiers: tuple[str, ...]) -> PixelReport:
        """Blank and verify the pixels of ``ds`` in place; the report says whether to hold
        the instance back."""
        report = PixelReport(checked=True)
        try:
            with decoding(ds):  # the pixel budget, checked before decoding
                pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - no codec, corrupt data: cannot verify
            report.held_back = True
            report.reason = f"pixels cannot be decoded to check for text ({type(exc).__name__})"
            return report
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        pixels = np.array(pixels, copy=True)
        if frames == 1:
            pixels = pixels[np.newaxis, ...]
        photometric = str(ds.get("PhotometricInterpretation", ""))
        boxes = self.boxes_for(ds)
        report.regions = [list(b) for b in boxes]
        for x, y, w, h in boxes:
            pixels[:, y:y + h, x:x + w, ...] = 0
        samples = sorted({0, frames // 2, frames - 1})[:_SAMPLE_FRAMES]
        report.frames_read = [s + 1 for s in samples]
        found = self._find(pixels, samples, identifiers, report)
        if found:
            for _kind, (x, y, w, h) in found:
                pixels[:, max(0, y - 2):y + h + 2, max(0, x - 2):x + w + 2, ...] = 0
            report.blanked_words = len(found)
            remaining = self._find(pixels, samples, identifiers, PixelReport())
            if remaining:
                report.held_back = True
                report.reason = ("patient identifiers can still be read in the pixels after "
                                 "cleaning; review by hand")
        if boxes or found:
            self._store(ds, pixels if frames > 1 else pixels[0], photometric)
        if not report.held_back:
            ds.BurnedInAnnotation = "NO"
        return report

    def _find(self, pixels: np.ndarray, samples: list[int], identifiers: tuple[str, ...],
              report: PixelReport) -> list[tuple[str, tuple[int, int, int, int]]]:
        found = []
        for index in samples:
            words = self.read_words(pixels[index])
            report.ocr_words += len(words)
            for word, box in words:
                kind = self._matches(word, identifiers)
                if kind:
                    found.append((kind, box))
                    report.identifiers_found.append({"kind": kind, "frame": index + 1,
                                                     "box": list(box)})
        return found

    @staticmethod
    def _store(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
        """Write changed pixels back, uncompressed (no further loss)."""
        colour = pixels.ndim == (4 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 3)
        if colour:
            target = "RGB"
        elif photometric in ("MONOCHROME1", "MONOCHROME2"):
            target = photometric
        else:
            target = "MONOCHROME2"
        bits_stored = int(ds.get("BitsStored", 8) or 8)
        ds.set_pixel_data(pixels, target, bits_stored, generate_instance_uid=False)
