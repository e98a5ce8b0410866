"""Burned-in text in pixels: blank the known regions, read what is left with OCR (Tesseract),
blank every line of text that carries an identifier of the patient (or anyone named in the
data set) or a label such as DOB, NHS or Name, read again, and hold the instance back if any
of it can still be read. Pixels are decoded and written back uncompressed (lossless); when
nothing had to be blanked, the pixel data stays as it was, byte for byte.

Frames read: the first, middle and last of a loop, every frame where bright (text-like) pixels
change, one composite of all frames (the brightest value of each pixel, or the darkest on
light backgrounds), one image of how far each pixel rises above its median over the frames
(text on a single frame of a speckled loop), and the composite turned a quarter each way
(vertical text).
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

from imageshare.archive.pixel_budget import decoding
from imageshare.deid.identity import Identity, normalise
from imageshare.domain.errors import ConfigurationError

DEFAULT_REGIONS = Path(__file__).with_name("regions.toml")
# Modalities and SOP classes whose images often carry burned-in text.
BURNED_IN_MODALITIES = {"US", "IVUS", "ES", "XC", "GM", "SC", "OT", "OP", "SM", "DOC", "XA",
                        "RF", "ECG", "IO", "PX", "DX", "CR", "MG", "TG"}
# Visible Light SOP classes (photographs, endoscopy, microscopy, scanned documents).
VISIBLE_LIGHT_SOP_CLASSES = "1.2.840.10008.5.1.4.1.1.77"
_MIN_CONFIDENCE = 30.0
_EXTRA_FRAMES = 5  # frames read besides first, middle, last (where text-like pixels change)
_OCR_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Words that label an identifier on screen: their line is blanked whatever follows them.
LABELS = {"DOB", "BORN", "BIRTH", "BIRTHDATE", "NAME", "PATIENT", "PATIENTNAME", "PAT",
          "MRN", "NHS", "NHSNO", "HOSP", "HOSPNO", "PID", "PATID", "ID", "ACC", "ACCESSION",
          "ADDRESS", "TEL", "PHONE"}


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
            int(entry.get("columns", 0)), boxes))  # type: ignore[arg-type]  # 4 numbers
    return regions


@dataclass
class PixelReport:
    """What the pixel path did to one instance."""

    checked: bool = False
    regions: list[list[int]] = field(default_factory=list)
    ocr_words: int = 0
    identifiers_found: list[dict[str, Any]] = field(default_factory=list)
    blanked_words: int = 0
    blanked_lines: int = 0
    frames_read: list[int] = field(default_factory=list)
    overlays_removed: int = 0
    unused_bits_cleared: bool = False  # data found outside Bits Stored was cleared
    held_back: bool = False
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly; what was found is named by kind and place, never by its text."""
        return {"checked": self.checked, "regions": self.regions, "ocr_words": self.ocr_words,
                "identifiers_found": self.identifiers_found,
                "blanked_words": self.blanked_words, "blanked_lines": self.blanked_lines,
                "frames_read": self.frames_read, "overlays_removed": self.overlays_removed,
                "unused_bits_cleared": self.unused_bits_cleared,
                "held_back": self.held_back, "reason": self.reason}


def may_have_burned_in_text(ds: Dataset, has_pixels: bool | None = None) -> bool:
    """True when the instance may carry burned-in text: Burned In Annotation YES or absent, a
    modality known for it, or (whatever the flag says) a colour image or a Visible Light one,
    as the verifier reads them. ``has_pixels`` says whether it has pixel data when ``ds`` is a
    header read without it."""
    if not (has_pixels if has_pixels is not None else "PixelData" in ds):
        return False
    annotation = str(ds.get("BurnedInAnnotation", "") or "").upper()
    if annotation != "NO" or str(ds.get("Modality", "")).upper() in BURNED_IN_MODALITIES:
        return True
    # colour images (a workstation's screenshot, a photograph) say NO as often as not: the
    # verifier reads them whatever the flag says, so they are cleaned here first
    try:
        return int(ds.get("SamplesPerPixel", 1) or 1) > 1 or str(
            ds.get("SOPClassUID", "") or "").startswith(VISIBLE_LIGHT_SOP_CLASSES)
    except (TypeError, ValueError):
        return True


def decode_frames(ds: Dataset) -> np.ndarray:
    """Every frame of ``ds``'s pixel data, decoded: (frames, rows, columns[, samples]).
    The one place the de-identifier decodes pixels (within the pixel budget)."""
    with decoding(ds):  # the pixel budget, checked before decoding
        pixels = np.array(ds.pixel_array, copy=True)
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        pixels = pixels[np.newaxis, ...]
    return pixels


def displayed(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (frames first, as decoded) in the colours a viewer shows, for reading text:
    a palette's colours; otherwise ``pixels`` itself (a view: blanking it blanks them)."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        return np.ascontiguousarray(apply_color_lut(pixels, ds))
    return pixels


def windowed(ds: Dataset, image: np.ndarray) -> np.ndarray | None:
    """What shows bright in a grey ``image`` of more than 8 bits through its first stored
    window, as a viewer first shows it (a few extreme pixels squash the rest into a grey
    level or two when stretched from minimum to maximum): white where a pixel is in the top
    fifth of the window's output, black elsewhere; None without a window."""
    if image.ndim != 2 or "WindowCenter" not in ds or "WindowWidth" not in ds \
            or int(ds.get("BitsStored", 8) or 8) <= 8:
        return None
    shown = np.asarray(apply_voi_lut(apply_modality_lut(image, ds), ds, index=0), np.float32)
    low, high = float(shown.min()), float(shown.max())
    return np.where(shown >= low + 0.8 * (high - low), 255, 0).astype(np.uint8)


def _to_8bit(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 3:
        frame = frame[..., :3].mean(axis=2)
    frame = frame.astype(np.float32)
    low, high = float(frame.min()), float(frame.max())
    return ((frame - low) * 255.0 / ((high - low) or 1.0)).astype(np.uint8)


@dataclass(frozen=True)
class Line:
    """One line of words read by OCR, with each word's box (x, y, width, height)."""

    words: tuple[str, ...]
    boxes: tuple[tuple[int, int, int, int], ...]

    def box(self, indexes: set[int] | None = None) -> tuple[int, int, int, int]:
        """The box around the chosen words (all by default)."""
        chosen = [self.boxes[i] for i in (indexes if indexes is not None
                                          else range(len(self.boxes)))]
        x0 = min(b[0] for b in chosen)
        y0 = min(b[1] for b in chosen)
        x1 = max(b[0] + b[2] for b in chosen)
        y1 = max(b[1] + b[3] for b in chosen)
        return x0, y0, x1 - x0, y1 - y0


def _kind(word: str) -> str:
    norm = normalise(word)
    digits = sum(c.isdigit() for c in norm)
    if digits >= 6 and digits == len(norm):
        return "date or number"
    return "number" if digits and digits == len(norm) else "name or identifier"


class BurnedInTextCleaner:
    """Blanks regions and identifying lines of text; verifies with OCR."""

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

    def read_lines(self, frame: np.ndarray) -> list[Line]:
        """Lines of words Tesseract reads on a frame, with boxes in frame pixels."""
        grey = _to_8bit(frame)
        if grey.mean() < 128:  # light text on dark: make it dark on light
            grey = 255 - grey
        image = Image.fromarray(grey).resize((grey.shape[1] * 2, grey.shape[0] * 2),
                                             Image.Resampling.LANCZOS)
        image = image.point(lambda v: 255 if v > 160 else 0)
        ocr = self._tesseract()
        data = ocr.image_to_data(image, config="--psm 11", output_type=ocr.Output.DICT)
        lines: dict[tuple[int, int, int], list[tuple[str, tuple[int, int, int, int]]]] = {}
        for i, text in enumerate(data["text"]):
            if not str(text).strip():
                continue
            try:
                confidence = float(data["conf"][i])
            except (TypeError, ValueError):
                confidence = 0.0
            if confidence < _MIN_CONFIDENCE:
                continue
            box = (data["left"][i] // 2, data["top"][i] // 2,
                   (data["width"][i] + 1) // 2 + 1, (data["height"][i] + 1) // 2 + 1)
            key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            lines.setdefault(key, []).append((str(text).strip(), box))
        out = []
        for words in lines.values():
            words.sort(key=lambda w: w[1][0])
            out.extend(_split_far_apart(words))
        return out

    def read_words(self, frame: np.ndarray) -> list[tuple[str, tuple[int, int, int, int]]]:
        """Every word Tesseract reads on a frame, with its box."""
        return [(w, b) for line in self.read_lines(frame) for w, b in zip(line.words,
                                                                           line.boxes,
                                                                           strict=True)]

    @staticmethod
    def identifying(line: Line, identity: Identity) -> set[int]:
        """The words of ``line`` that carry an identifier or label one."""
        hits = identity.hits_in_line(list(line.words))
        if any(normalise(w) in LABELS for w in line.words):
            hits.update(range(len(line.words)))
        return hits

    def clean(self, ds: Dataset, identity: Identity) -> PixelReport:
        """Blank and verify the pixels of ``ds`` in place; the report says whether to hold
        the instance back."""
        report = PixelReport(checked=True)
        try:
            pixels = decode_frames(ds)
        except Exception as exc:  # noqa: BLE001 - no codec, corrupt data: cannot verify
            report.held_back = True
            report.reason = f"pixels cannot be decoded to check for text ({type(exc).__name__})"
            return report
        frames = pixels.shape[0]
        photometric = str(ds.get("PhotometricInterpretation", ""))
        try:
            shown = displayed(ds, pixels)
        except Exception as exc:  # noqa: BLE001 - a palette or LUT that cannot be applied
            report.held_back = True
            report.reason = f"pixels cannot be shown as a viewer would ({type(exc).__name__})"
            return report
        boxes = self.boxes_for(ds)
        report.regions = [list(b) for b in boxes]
        for x, y, w, h in boxes:
            for array in (pixels, shown):
                array[:, max(0, y):y + h, max(0, x):x + w, ...] = 0
        samples = _frames_to_read(shown)
        report.frames_read = [s + 1 for s in samples]
        found, hit_frames = self._find(shown, samples, identity, report, ds)
        if found:
            for x, y, w, h in found:
                margin = max(4, min(w, h) // 2)  # of the line's height, or width if vertical
                for array in (pixels, shown):
                    array[:, max(0, y - margin):y + h + margin,
                          max(0, x - 2 * margin):x + w + 2 * margin, ...] = 0
            report.blanked_lines = len(found)
            # read again: the frames where something was found, and the composite of all
            remaining, _ = self._find(shown, sorted(hit_frames or {samples[0]}), identity,
                                      PixelReport(), ds)
            if remaining:
                report.held_back = True
                report.reason = ("patient identifiers can still be read in the pixels after "
                                 "cleaning; review by hand")
        if boxes or found:
            self._store(ds, pixels if frames > 1 else pixels[0], photometric)
        if not report.held_back:
            ds.BurnedInAnnotation = "NO"
        return report

    def _find(self, pixels: np.ndarray, samples: list[int], identity: Identity,
              report: PixelReport, ds: Dataset | None = None,
              ) -> tuple[list[tuple[int, int, int, int]], set[int]]:
        """The boxes of every line carrying an identifier, on the sampled frames, on the
        composite of all frames, on what shows on only some frames, on the overview turned a
        quarter each way (vertical text) and through ``ds``'s stored window; and the frames
        they were found on."""
        found = []
        hit_frames: set[int] = set()
        overview = _composite(pixels) if pixels.shape[0] > 1 else pixels[0]
        images: list[tuple[int, str, np.ndarray, int]] = [
            (s, f"frame {s + 1}", pixels[s], 0) for s in samples]
        if pixels.shape[0] > 1:
            images.append((-1, "all frames", overview, 0))
        if pixels.shape[0] > 3:
            images.append((-1, "frames where it shows briefly", _transient(pixels), 0))
        images += [(-1, "turned a quarter", overview, 1),
                   (-1, "turned a quarter", overview, 3)]
        shown = windowed(ds, overview) if ds is not None else None
        if shown is not None:
            images.append((-1, "through the stored window", shown, 0))
        read = self._read_all([(image, turns) for _, _, image, turns in images])
        for (index, place, _image, _turns), lines in zip(images, read, strict=True):
            for line in lines:
                report.ocr_words += len(line.words)
                hits = self.identifying(line, identity)
                if not hits:
                    continue
                found.append(line.box())
                if index >= 0:
                    hit_frames.add(index)
                report.blanked_words += len(hits)
                for i in sorted(hits):
                    report.identifiers_found.append({"kind": _kind(line.words[i]),
                                                     "where": place,
                                                     "box": list(line.boxes[i])})
        return found, hit_frames

    def read_turned(self, image: np.ndarray, turns: int) -> list[Line]:
        """Lines read on ``image`` turned ``turns`` quarters anticlockwise, with boxes in
        the unturned image's pixels."""
        if not turns % 4:
            return self.read_lines(image)
        height, width = image.shape[0], image.shape[1]
        lines = self.read_lines(np.ascontiguousarray(np.rot90(image, turns)))
        return [Line(line.words, tuple(_unturn(box, turns, width, height)
                                       for box in line.boxes)) for line in lines]

    def _read_all(self, images: list[tuple[np.ndarray, int]]) -> list[list[Line]]:
        """Lines read on each (image, quarter turns) (OCR runs two at a time: Tesseract is a
        process)."""
        if len(images) == 1:
            return [self.read_turned(*images[0])]
        with ThreadPoolExecutor(max_workers=_OCR_WORKERS) as pool:
            return list(pool.map(lambda one: self.read_turned(*one), images))

    def clean_overlays(self, ds: Dataset, identity: Identity, report: PixelReport) -> None:
        """Clean Graphics for overlay planes: lines that carry an identifier are blanked; a
        plane where one can still be read after that is removed."""
        from pydicom.pixels.utils import pack_bits

        for group in range(0x6000, 0x6020, 2):
            if Tag(group, 0x3000) not in ds:
                continue
            try:
                planes = np.asarray(ds.overlay_array(group), dtype=np.uint8)
            except Exception:  # noqa: BLE001 - an overlay we cannot read cannot be shown safe
                self._drop_group(ds, group)
                report.overlays_removed += 1
                continue
            planes = planes if planes.ndim == 3 else planes[np.newaxis, ...]
            stored = bytes(ds[Tag(group, 0x3000)].value or b"")
            if stored[(planes.size + 7) // 8:].strip(b"\0"):
                # bytes after the plane's bits: no viewer shows them, so they go
                ds[Tag(group, 0x3000)].value = pack_bits(planes.ravel())
            images = (1 - planes) * 255  # text dark on light
            found = [line.box() for lines in self._read_all([(i, 0) for i in images])
                     for line in lines
                     if self.identifying(line, identity)]
            if not found:
                continue
            for x, y, w, h in found:
                margin = max(4, h // 2)
                planes[:, max(0, y - margin):y + h + margin,
                       max(0, x - 2 * margin):x + w + 2 * margin] = 0
            still = any(self.identifying(line, identity)
                        for lines in self._read_all([(p, 0) for p in (1 - planes) * 255])
                        for line in lines)
            if still:
                self._drop_group(ds, group)
                report.overlays_removed += 1
            else:
                ds[Tag(group, 0x3000)].value = pack_bits(planes.ravel())

    @staticmethod
    def _drop_group(ds: Dataset, group: int) -> None:
        for tag in [t for t in ds.keys() if t.group == group]:
            del ds[tag]

    @staticmethod
    def _store(ds: Dataset, pixels: np.ndarray, photometric: str) -> None:
        """Write changed pixels back, uncompressed (no further loss); an instance in the
        retired big endian syntax is written little endian (pydicom writes no big endian
        pixels), as a compressed one is."""
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
            _words_to_little_endian(ds)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.set_original_encoding(False, True, ds.original_character_set)
        if pixels.dtype.byteorder == ">":  # decoded from big endian: stored little endian
            pixels = pixels.astype(pixels.dtype.newbyteorder("<"))
        colour = pixels.ndim == (4 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else 3)
        if colour:
            target = "RGB"
        elif photometric in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
            target = photometric
        else:
            target = "MONOCHROME2"
        bits_stored = int(ds.get("BitsStored", 8) or 8)
        ds.set_pixel_data(pixels, target, bits_stored, generate_instance_uid=False)


# Binary values made of words, by word size: kept as the bytes read, so a data set read big
# endian must have them swapped before it is written little endian.
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_WORD_SIZES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _words_to_little_endian(ds: Dataset) -> None:
    """Swap the bytes of every word value (LUT data, overlays, ...) of ``ds``, read big
    endian, at any depth, so that it means the same written little endian (pixel data is
    written afresh by the caller)."""
    for element in ds.iterall():
        size = _WORD_SIZES.get(str(element.VR))
        if size is None or element.tag == PIXEL_DATA or not isinstance(element.value, bytes):
            continue
        value = element.value
        usable = len(value) - len(value) % size
        words = np.frombuffer(value[:usable], dtype=f">u{size}")
        element.value = words.astype(f"<u{size}").tobytes() + value[usable:]


def _split_far_apart(words: list[tuple[str, tuple[int, int, int, int]]]) -> list[Line]:
    """Tesseract's line, split where words are far apart (columns of a banner)."""
    out: list[Line] = []
    current: list[tuple[str, tuple[int, int, int, int]]] = []
    for word in words:
        if current:
            prev = current[-1][1]
            gap = word[1][0] - (prev[0] + prev[2])
            if gap > 3 * max(prev[3], word[1][3]):
                out.append(Line(tuple(w for w, _ in current), tuple(b for _, b in current)))
                current = []
        current.append(word)
    if current:
        out.append(Line(tuple(w for w, _ in current), tuple(b for _, b in current)))
    return out


def _frames_to_read(pixels: np.ndarray) -> list[int]:
    """First, middle and last frame, and up to a few frames where bright (text-like) pixels
    appear or change."""
    frames = pixels.shape[0]
    chosen = {0, frames // 2, frames - 1}
    if frames > 3:
        step = max(1, frames // 64)  # look at up to 64 frames
        masks = []
        for index in range(0, frames, step):
            grey = pixels[index] if pixels.ndim == 3 else pixels[index].max(axis=-1)
            high = grey.max()
            masks.append((index, grey >= max(1, high) * 0.8 if high else grey > 0))
        changes = []
        previous = masks[0][1]
        for index, mask in masks[1:]:
            changed = int(np.count_nonzero(mask != previous))
            if changed > max(30, mask.size // 500):
                changes.append(index)
                previous = mask
        if len(changes) > _EXTRA_FRAMES:
            picks = np.linspace(0, len(changes) - 1, _EXTRA_FRAMES).round().astype(int)
            changes = [changes[i] for i in picks]
        chosen.update(changes)
    return sorted(chosen)


def _composite(pixels: np.ndarray) -> np.ndarray:
    """One image showing every frame's text: the brightest value of each pixel over all
    frames (the darkest when the image is mostly light)."""
    grey = pixels if pixels.ndim == 3 else pixels[..., :3].max(axis=-1)
    if float(grey[0].mean()) > float(grey[0].max()) / 2:
        return grey.min(axis=0)
    return grey.max(axis=0)


def _transient(pixels: np.ndarray) -> np.ndarray:
    """One image of what shows on only some frames (text put on a single frame of a loop):
    how far each pixel rises above its usual (median) value at most, over all frames (how
    far it falls, on light images)."""
    grey = pixels if pixels.ndim == 3 else pixels[..., :3].max(axis=-1)
    step = max(1, grey.shape[0] // 32)
    usual = np.median(grey[::step], axis=0).astype(np.float32)
    if float(grey[0].mean()) > float(grey[0].max()) / 2:  # light
        return usual - grey.min(axis=0)
    return grey.max(axis=0) - usual


def _unturn(box: tuple[int, int, int, int], turns: int, width: int,
            height: int) -> tuple[int, int, int, int]:
    """A box read on an image turned ``turns`` quarters anticlockwise, in the unturned
    image of ``width`` x ``height``."""
    x, y, w, h = box
    if turns % 4 == 1:
        return width - y - h, x, h, w
    if turns % 4 == 3:
        return y, height - x - w, h, w
    return width - x - w, height - y - h, w, h
