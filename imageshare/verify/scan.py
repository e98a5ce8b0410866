"""Looking for a source's identifiers in everything an output holds.

A DICOM output is read three ways: every element value at any depth (standard, private, UN, SR
content, overlay and graphic text; identifiers split across elements too; each in the character
set its item declares; a report's birth date, moved or not, and any text of a report's
observer, subject or participant context that is not a placeholder are findings; AE titles,
station names and local codes are also read for the institution named as labels write it,
``STMARYS_CT1``; UIDs for the source's dates written in them), its raw bytes
(preamble, file meta, header, encapsulated fragments' headers, anything after the pixel data;
not the pixel samples themselves, though anything but zeros after a native image's samples and
a basic offset table holding anything but its frames' offsets are findings), and with OCR its
pixels, icon images and overlay planes. Encapsulated PDFs are read as text. What cannot be
read at all is a finding: recorded sound (audio waveforms, curves' audio), overlay bitmaps
where no viewer shows them (beyond group 601E, in sequence items). Other outputs:
PNG/JPEG metadata and pixels, MP4 metadata and frames, PDF text, ZIP member names and comments,
file and folder names. Findings name the kind of identifier and where it is, never its value.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from imageshare.verify import rawdicom
from imageshare.verify.codes import (
    CODE_MEANING,
    CODE_TAGS,
    CODE_VALUE,
    CODING_SCHEME,
    MODALITY_TAGS,
    defined_modalities,
    standard_code,
)
from imageshare.verify.identity import (
    DUMMY_TEMPORAL,
    KEEP_DATES,
    KEEP_DEVICE,
    KEEP_INSTITUTION,
    KEEP_TIMES,
    SINGLE_BYTE_ENCODINGS,
    SourceIdentity,
    normalised,
    words_of,
)

OCR_AUTO, OCR_ALWAYS, OCR_NEVER = "auto", "always", "never"
# Images of these modalities often carry burned-in text; the verifier reads them with OCR.
TEXT_MODALITIES = {"US", "IVUS", "ES", "XC", "GM", "SC", "OT", "OP", "SM", "DOC", "XA", "RF",
                   "ECG", "IO", "PX", "DX", "CR", "MG", "TG"}
# Labels that put an identifier on screen: a line with one of them and a value is a finding.
SCREEN_LABELS = {"DOB", "BORN", "BIRTH", "NAME", "PATIENT", "MRN", "NHS", "NHSNO", "PID",
                 "HOSPNO", "ACCESSION", "ADDRESS"}
_TEXT_VRS = {"AE", "AS", "CS", "DS", "IS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR",
             "UT", "DA", "DT", "TM"}
_BYTES_VRS = {"OB", "OW", "UN", "OD", "OF", "OL", "OV"}
_FREE_TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN", "OB", "UN", None}
# Values that are dates, times, UIDs or numbers themselves: not read for written dates (the
# source's dates and times are checked by place; a new UID or a number may hold any digits).
_NOT_WRITTEN_DATES = {"DA", "DT", "TM", "UI", "DS", "IS", "AS"}
_OCR_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Finding:
    """One identifier found in an output: which file, what kind, where (never the value)."""

    file: str
    kind: str
    where: str

    def as_dict(self) -> dict[str, str]:
        """JSON-friendly."""
        return {"file": self.file, "kind": self.kind, "where": self.where}

    def __str__(self) -> str:
        return f"{self.kind} in {self.where}"


class TextReader(Protocol):
    """Reads lines of words in an 8-bit grey image."""

    def lines(self, grey: np.ndarray) -> list[list[str]]:
        """Every line of words read, in reading order."""
        ...


class TesseractReader:
    """Tesseract, prepared the verifier's own way: dark text on light, upscaled, binarised at
    Otsu's threshold, sparse text."""

    def __init__(self) -> None:
        import pytesseract

        os.environ.setdefault("OMP_THREAD_LIMIT", "1")
        self._ocr = pytesseract

    def lines(self, grey: np.ndarray) -> list[list[str]]:
        """Every line of words Tesseract reads."""
        from PIL import Image

        if float(np.median(grey)) < 128:
            grey = 255 - grey
        threshold = _otsu(grey)
        binary = np.where(grey > threshold, 255, 0).astype(np.uint8)
        image = Image.fromarray(binary).resize((grey.shape[1] * 2, grey.shape[0] * 2),
                                               Image.Resampling.BICUBIC)
        data = self._ocr.image_to_data(image, config="--psm 11 --oem 1",
                                       output_type=self._ocr.Output.DICT)
        grouped: dict[tuple[int, int, int], list[tuple[int, str]]] = {}
        for i, text in enumerate(data["text"]):
            word = str(text).strip()
            if not word:
                continue
            key = (data["block_num"][i], data["par_num"][i], data["line_num"][i])
            grouped.setdefault(key, []).append((data["left"][i], word))
        return [[w for _, w in sorted(words)] for words in grouped.values()]


def _otsu(grey: np.ndarray) -> int:
    histogram = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    total = histogram.sum()
    if total == 0:
        return 128
    levels = np.arange(256)
    weight = np.cumsum(histogram)
    mean = np.cumsum(histogram * levels)
    between = (mean[-1] * weight / total - mean) ** 2 / np.maximum(
        weight * (total - weight), 1e-9)
    return int(np.argmax(between))


def _unused_bits_carry_data(raw: rawdicom.RawFile, data: Any) -> bool:
    """True when native pixel data holds anything outside Bits Stored but zeros (or, for
    signed samples stored from bit 0, copies of the sign bit)."""
    def number(tag: int, default: int) -> int:
        value = raw.top.get(tag, b"")
        return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else default

    allocated, stored = number(0x00280100, 0), number(0x00280101, 0)
    high, signed = number(0x00280102, stored - 1), number(0x00280103, 0) == 1
    at, end = raw.pixel_region
    if allocated not in (8, 16, 32) or not 0 < stored < allocated \
            or bytes(data[at:at + 4]) != b"\xe0\x7f\x10\x00":
        return False
    start = at + (8 if raw.syntax == "1.2.840.10008.1.2" else 12)
    size = allocated // 8
    count = (end - start) // size
    unused = ((1 << allocated) - 1) ^ (((1 << stored) - 1) << (high - stored + 1))
    for first in range(0, count, 1 << 22):  # a few million samples at a time, not copied
        samples = np.frombuffer(data, f"<u{size}", min(1 << 22, count - first),
                                start + first * size)
        kind = samples.dtype.type
        if signed and high == stored - 1:  # from the sign bit up: all zeros or all ones
            top = samples >> kind(high)
            if np.any((top != 0) & (top != kind((1 << (allocated - high)) - 1))):
                return True
        elif np.any(samples & kind(unused)):
            return True
    return False


def _image_bytes(rows: int, columns: int, frames: int, samples: int, allocated: int,
                 photometric: str) -> int:
    """How many bytes a native image of these attributes takes (PS3.5 8.1.1; 4:2:2 colour
    stores two samples a pixel; single bits are packed)."""
    if photometric.startswith("YBR") and photometric.endswith("422"):
        samples = 2
    return (rows * columns * frames * samples * allocated + 7) // 8


def _after_the_image(raw: rawdicom.RawFile, data: Any) -> bool:
    """True when native pixel data holds anything but zeros after its image: bytes that
    decoders drop (and no viewer shows, nor OCR reads)."""
    def number(tag: int) -> int:
        value = raw.top.get(tag, b"")
        return struct.unpack("<H", value[:2])[0] if len(value) >= 2 else 0

    try:
        frames = int(raw.top.get(0x00280008, b"1").decode("ascii").strip(" \0") or 1)
    except ValueError:
        return False  # the image cannot be decoded at all: not this check's finding
    photometric = raw.top.get(0x00280004, b"").decode("latin-1").strip(" \0").upper()
    image = _image_bytes(number(0x00280010), number(0x00280011), frames,
                         number(0x00280002) or 1, number(0x00280100), photometric)
    at, end = raw.pixel_region
    start = at + (8 if raw.syntax == "1.2.840.10008.1.2" else 12)
    if not image or start + image >= end:
        return False
    return bool(bytes(data[start + image:end]).strip(b"\0"))


def _after_the_image_in(ds: Dataset) -> bool:
    """:func:`_after_the_image` for a data set read by pydicom (big endian, deflated)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    value = ds.get("PixelData")
    if value is None or (syntax is not None and syntax.is_encapsulated):
        return False
    try:
        image = _image_bytes(int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames") or 1),
                             int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated),
                             str(ds.get("PhotometricInterpretation", "")).upper())
    except (AttributeError, TypeError, ValueError):
        return False
    return bool(image) and bool(bytes(value[image:]).strip(b"\0"))


def _offset_table_holds_offsets(raw: rawdicom.RawFile, data: Any) -> bool:
    """True when the basic offset table of encapsulated pixel data is empty or holds its
    frames' offsets only (whole 32-bit values, the first 0, increasing, each the start of a
    fragment): anything else in it is never decoded nor shown."""
    if not raw.pixel_items:
        return True
    (table_at, length), fragments = raw.pixel_items[0], raw.pixel_items[1:]
    if length == 0:
        return True
    if length % 4 or not fragments:
        return False
    offsets = struct.unpack(f"<{length // 4}L", bytes(data[table_at:table_at + length]))
    first = fragments[0][0] - 8
    starts = {start - 8 - first for start, _ in fragments}
    return offsets[0] == 0 and all(b > a for a, b in zip(offsets, offsets[1:], strict=False)) \
        and all(o in starts for o in offsets)


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = image[..., :3].max(axis=2)
    image = image.astype(np.float32)
    low, high = float(image.min()), float(image.max())
    return ((image - low) * 255.0 / ((high - low) or 1.0)).astype(np.uint8)


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def decode_pixels(ds: Dataset) -> np.ndarray:
    """The frames of ``ds``'s pixel data: (frames, rows, columns[, samples]). The one place the
    verifier decodes pixels (within the pixel budget)."""
    from imageshare.archive.pixel_budget import decoding

    with decoding(ds):  # the pixel budget, checked before decoding
        pixels = np.asarray(ds.pixel_array)
    if int(ds.get("NumberOfFrames", 1) or 1) == 1:
        pixels = pixels[np.newaxis, ...]
    return pixels


def as_shown(ds: Dataset, frames: np.ndarray) -> np.ndarray:
    """``frames`` in the colours a viewer shows: a palette's, not its indexes."""
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        return np.asarray(apply_color_lut(frames, ds))
    return frames


def through_window(ds: Dataset, frame: np.ndarray) -> np.ndarray | None:
    """The bright part of a grey frame through the first stored window, as a viewer shows it
    (a few extreme pixels cannot then squash the rest): 255 at or above three quarters of the
    window's output, 0 below; None when there is no window."""
    if frame.ndim != 2 or "WindowWidth" not in ds or "WindowCenter" not in ds:
        return None
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    shown = np.asarray(apply_voi_lut(apply_modality_lut(frame, ds), ds, index=0), np.float32)
    cut = np.percentile(shown, 0) + 0.75 * float(np.ptp(shown))
    return np.where(shown >= cut, 255, 0).astype(np.uint8)


class Verifier:
    """Compares outputs with their sources; findings hold a file back."""

    def __init__(self, ocr: str = OCR_AUTO, reader: TextReader | None = None) -> None:
        if ocr not in (OCR_AUTO, OCR_ALWAYS, OCR_NEVER):
            raise ValueError(f"ocr must be auto, always or never, not {ocr!r}")
        self.ocr = ocr
        self._reader = reader

    def reader(self) -> TextReader:
        """The OCR engine (started on first use)."""
        if self._reader is None:
            self._reader = TesseractReader()
        return self._reader

    # -- sources -----------------------------------------------------------------------------

    @staticmethod
    def identity(sources: list[Dataset], keep: frozenset[str] = frozenset()) -> SourceIdentity:
        """What the sources say about who they are (their headers are enough)."""
        return SourceIdentity.of(sources, keep)

    @staticmethod
    def text_prone(source: Dataset) -> bool:
        """True when the source image may carry burned-in text (by the verifier's own rule)."""
        return (str(source.get("BurnedInAnnotation", "") or "").upper() == "YES"
                or str(source.get("Modality", "") or "").upper() in TEXT_MODALITIES
                or int(source.get("SamplesPerPixel", 1) or 1) > 1
                or str(source.get("SOPClassUID", "")).startswith(
                    ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.77")))

    # -- outputs -----------------------------------------------------------------------------

    def check_dicom(self, stream: BinaryIO, identity: SourceIdentity, name: str,
                    text_prone: bool = False) -> list[Finding]:
        """Findings in one DICOM output (a seekable binary stream at its start)."""
        data = _mapped(stream)
        try:
            raw = rawdicom.read(data)
        except (ValueError, struct.error) as exc:
            return [Finding(name, "unreadable DICOM", str(exc))]
        if raw is None:
            return self._check_with_pydicom(stream, identity, name, text_prone)
        findings: list[Finding] = []
        pixel_at, pixel_end = raw.pixel_region
        if pixel_end:
            parts = [("header bytes", data[:pixel_at]),
                     ("bytes after the pixel data", data[pixel_end:])]
            parts += [("encapsulated pixel data", text) for text in raw.pixel_texts]
        else:
            parts = [("header bytes", data[:])]
        for where, part in parts:
            for kind in dict.fromkeys(identity.in_bytes(bytes(part))):
                findings.append(Finding(name, kind, f"raw {where}"))
        if raw.native_pixels and _unused_bits_carry_data(raw, data):
            findings.append(Finding(name, "data hidden in the pixel data's unused bits",
                                    "bits outside Bits Stored"))
        if raw.native_pixels and _after_the_image(raw, data):
            findings.append(Finding(name, _AFTER_THE_IMAGE, "pixel data"))
        if raw.encapsulated_pixels and not _offset_table_holds_offsets(raw, data):
            findings.append(Finding(name, _NOT_OFFSETS, "encapsulated pixel data"))
        encodings = _encodings(raw.top.get(_CHARSET_TAG, b""))
        charsets = {element.path[:-1]: _encodings(element.value) for element in raw.elements
                    if element.tag == _CHARSET_TAG and len(element.path) > 1}
        joined: list[str] = []
        standard = _standard_items(raw.elements, encodings)
        for element in raw.elements:
            if element.tag in CODE_TAGS and element.path[:-1] in standard:
                continue  # a standard code with its standard meaning: no one's name
            self._raw_element(element, identity, name,
                              _item_encodings(element.path, charsets, encodings) if charsets
                              else encodings, joined, findings)
        for kind in dict.fromkeys(identity.in_pieces(joined)):
            if not any(f.kind == kind for f in findings):
                findings.append(Finding(name, kind, "split across the values of two elements"))
        findings += [Finding(name, _BIRTH_DATE_ITEM, element.where + rawdicom.label(element.tag))
                     for element in _birth_dates_left(raw.elements)]
        findings += [Finding(name, _IDENTITY_ITEM, element.where + rawdicom.label(element.tag))
                     for element in _identity_texts_left(raw.elements, identity.keep)]
        self._raw_documents(raw, identity, name, findings)
        wants_ocr = self.ocr == OCR_ALWAYS or (self.ocr == OCR_AUTO and (
            text_prone or _raw_text_prone(raw)))
        graphics = 0x00880200 in raw.sequences or any(
            (tag >> 16) & 0xFF00 == 0x6000 and tag & 0xFFFF == 0x3000 for tag in raw.top)
        has_pixels = raw.native_pixels or raw.encapsulated_pixels
        if self.ocr != OCR_NEVER and (graphics or (wants_ocr and has_pixels)):
            try:
                full = dcmread(io.BytesIO(bytes(data)), force=True)
            except Exception as exc:  # noqa: BLE001
                return [*findings, Finding(name, "unreadable DICOM", type(exc).__name__)]
            if wants_ocr and "PixelData" in full:
                self._ocr_pixels(full, identity, name, "pixels", findings)
            self._ocr_graphics(full, identity, name, findings)
        return findings

    def _raw_element(self, element: rawdicom.RawElement, identity: SourceIdentity, name: str,
                     encodings: list[str], joined: list[str], findings: list[Finding]) -> None:
        tag, vr, value = element.tag, element.vr, element.value
        if value and tag in _PIXEL_TAGS and _nested_pixels(element.path[:-1]):
            findings.append(Finding(name, _NESTED_PIXELS, element.where + rawdicom.label(tag)))
            return
        if not value or tag in _PIXEL_TAGS or (
                (tag >> 16) & 0xFF00 == 0x6000 and tag & 0xFFFF == 0x3000):
            return
        if vr in _BYTES_VRS:
            blobs, texts = _binary_texts(value, utf16=vr in _UTF16_VRS)
            for blob in blobs:
                for kind in dict.fromkeys(identity.in_bytes(blob)):
                    findings.append(Finding(name, kind, element.where + rawdicom.label(tag)))
        elif vr in _TEXT_VRS:
            if value.isascii() and b"\x1b" not in value:
                text = value.decode("ascii")
            else:  # other character sets (ISO 2022 ones switch with escape sequences)
                text = _decode(value, encodings, vr)
            texts = [text.strip(" \0")]
        else:
            return  # numbers
        if tag in MODALITY_TAGS and defined_modalities(texts[0]):
            return  # the standard's terms, whoever is called Ko
        found = len(findings)
        if vr in ("DA", "DT", "TM"):
            self._temporal(identity, element.path, vr, texts, name, "", findings)
        if vr in _FREE_TEXT_VRS:
            joined.append(normalised(texts[0]))
        findings += [Finding(name, kind, "") for kind in dict.fromkeys(
            kind for text in texts for kind in _kinds_in(identity, text, vr, tag))]
        if len(findings) > found:  # named only when something was found (it costs)
            label = element.where + rawdicom.label(tag)
            findings[found:] = [Finding(f.file, f.kind, label) for f in findings[found:]]

    def _raw_documents(self, raw: rawdicom.RawFile, identity: SourceIdentity, name: str,
                       findings: list[Finding]) -> None:
        """Encapsulated documents' text, and documents the de-identifier removes (in sequence
        items, HPGL: see :func:`_kept_document`); and, since every element has been read by
        now, file meta elements out of their place (see :func:`_misplaced_file_meta`),
        overlays no viewer shows (:func:`_misplaced_overlay`) and recorded sound."""
        findings += [Finding(name, _MISPLACED_META, element.where + rawdicom.label(element.tag))
                     for element in _misplaced_file_meta(raw.elements)]
        findings += [Finding(name, _KEPT_DOCUMENT, element.where + rawdicom.label(element.tag))
                     for element in raw.elements
                     if element.value and _kept_document(element.tag, len(element.path) - 1)]
        findings += [Finding(name, _MISPLACED_OVERLAY,
                             element.where + rawdicom.label(element.tag))
                     for element in raw.elements
                     if element.value and _misplaced_overlay(element.tag, len(element.path) - 1)]
        interpretations = [e.value.decode("latin-1") for e in raw.elements
                           if e.tag == _SAMPLE_INTERPRETATION]
        if _sound(raw.top.get(_SOP_CLASS_UID, b"").decode("latin-1"), interpretations,
                  any(e.value for e in raw.elements if e.tag == _WAVEFORM_DATA)):
            findings.append(Finding(name, _SOUND, rawdicom.label(_WAVEFORM_DATA)))
        findings += [Finding(name, _SOUND, element.where + rawdicom.label(element.tag))
                     for element in raw.elements
                     if element.value and _curve_audio(element.tag)]
        document = raw.top.get(0x00420011)
        if not document:
            return
        ds = Dataset()
        ds.EncapsulatedDocument = document
        mime = raw.top.get(0x00420012, b"").decode("latin-1").strip(" \0")
        if mime:
            ds.MIMETypeOfEncapsulatedDocument = mime
        self._documents(ds, identity, name, findings)

    def _check_with_pydicom(self, stream: BinaryIO, identity: SourceIdentity, name: str,
                            text_prone: bool = False) -> list[Finding]:
        """The same check for encodings the raw reader leaves to pydicom (big endian,
        deflated, files without a preamble)."""
        findings: list[Finding] = []
        stream.seek(0)
        try:
            full = dcmread(stream, force=True)
        except Exception as exc:  # noqa: BLE001 - what cannot be read cannot be shown safe
            return [Finding(name, "unreadable DICOM", type(exc).__name__)]
        stream.seek(0)
        for kind in dict.fromkeys(identity.in_bytes(stream.read())):
            findings.append(Finding(name, kind, "raw bytes"))
        joined: list[str] = []
        meta = getattr(full, "file_meta", None)
        if meta is not None:
            self._elements(meta, identity, name, (), "", joined, findings, file_meta=True)
        self._elements(full, identity, name, (), "", joined, findings)
        for kind in dict.fromkeys(identity.in_pieces(joined)):
            if not any(f.kind == kind for f in findings):
                findings.append(Finding(name, kind, "split across the values of two elements"))
        self._documents(full, identity, name, findings)
        if _sound(str(full.get("SOPClassUID", "") or ""), [
                str(item.get("WaveformSampleInterpretation", "") or "")
                for item in full.get("WaveformSequence", None) or []],
                any(item.get("WaveformData") for item in full.get("WaveformSequence", None)
                    or [])):
            findings.append(Finding(name, _SOUND, rawdicom.label(_WAVEFORM_DATA)))
        if _after_the_image_in(full):
            findings.append(Finding(name, _AFTER_THE_IMAGE, "pixel data"))
        if self.ocr == OCR_ALWAYS or (self.ocr == OCR_AUTO and (
                text_prone or self.text_prone(full))):
            if "PixelData" in full:
                self._ocr_pixels(full, identity, name, "pixels", findings)
        if self.ocr != OCR_NEVER:
            self._ocr_graphics(full, identity, name, findings)
        return findings

    def _elements(self, ds: Dataset, identity: SourceIdentity, name: str,
                  path: tuple[int, ...], where: str, joined: list[str],
                  findings: list[Finding], depth: int = 0, file_meta: bool = False,
                  fetal: bool = False) -> None:
        """Every element of ``ds`` at any depth (``file_meta``: ``ds`` is the file meta
        group, the one place group 0002 belongs; ``fetal``: ``ds`` is an item of a fetus's
        subject context)."""
        if depth > 16:
            return
        standard = depth > 0 and _standard_item(ds)
        if depth > 0 and _birth_date_item(ds):
            findings.append(Finding(name, _BIRTH_DATE_ITEM, where.removesuffix(" > ")))
        if depth > 0 and _identity_item(ds, identity.keep, fetal):
            findings.append(Finding(name, _IDENTITY_ITEM, where.removesuffix(" > ")))
        for tag in list(ds.keys()):
            tag = BaseTag(tag)
            if standard and tag in CODE_TAGS:
                continue  # a standard code with its standard meaning: no one's name
            if tag in _PIXEL_TAGS and _nested_pixels(path) and ds.get_item(tag).value:
                findings.append(Finding(name, _NESTED_PIXELS, self._label(tag, where)))
                continue
            if _kept_document(tag, depth) and ds.get_item(tag).value:
                findings.append(Finding(name, _KEPT_DOCUMENT, self._label(tag, where)))
            if _misplaced_overlay(int(tag), depth) and ds.get_item(tag).value:
                findings.append(Finding(name, _MISPLACED_OVERLAY, self._label(tag, where)))
            if _curve_audio(int(tag)) and ds.get_item(tag).value:
                findings.append(Finding(name, _SOUND, self._label(tag, where)))
            if tag.group == 0x7FE0 or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000):
                continue
            if tag.group == 0x0002 and not file_meta:
                findings.append(Finding(name, _MISPLACED_META, self._label(tag, where)))
            raw = ds.get_item(tag)
            vr = raw.VR
            if vr in (None, "UN") and not tag.is_private:
                vr = _dictionary_vr(tag) if vr is None else vr
            if vr == "SQ" or isinstance(raw.value, Sequence):
                try:
                    items = ds[tag].value or []
                except Exception:  # noqa: BLE001 - an unreadable sequence cannot be safe
                    findings.append(Finding(name, "unreadable sequence", self._label(tag, where)))
                    continue
                label = self._label(tag, where)
                fetal_items = _fetus_context(items) or (
                    tag == _CONTENT_SEQUENCE and _fetal_section(ds))
                for index, item in enumerate(items):
                    self._elements(item, identity, name, (*path, int(tag), index),
                                   f"{label}[{index + 1}] > ", joined, findings, depth + 1,
                                   fetal=fetal_items)
                continue
            if vr not in _TEXT_VRS and vr not in _BYTES_VRS and vr is not None:
                continue  # numbers
            texts = self._texts(ds, tag, raw, vr, identity, name, where, findings)
            if not texts:
                continue
            if vr in ("DA", "DT", "TM"):
                self._temporal(identity, (*path, int(tag)), vr, texts, name,
                               self._label(tag, where), findings)
            if tag in MODALITY_TAGS and defined_modalities(texts[0]):
                continue  # the standard's terms, whoever is called Ko
            if vr in _FREE_TEXT_VRS:
                joined.append(normalised(texts[0]))
            kinds = [kind for text in texts for kind in _kinds_in(identity, text, vr,
                                                                  int(tag))]
            for kind in dict.fromkeys(kinds):
                findings.append(Finding(name, kind, self._label(tag, where)))

    def _texts(self, ds: Dataset, tag: BaseTag, raw: Any, vr: str | None,
               identity: SourceIdentity, name: str, where: str,
               findings: list[Finding]) -> list[str]:
        """An element's value as text: ASCII bytes as they are, other text decoded with the
        data set's character set, binary values as Latin-1 and their UTF-16 runs, inflated
        when compressed (and searched as bytes: see :func:`_binary_texts`)."""
        value = raw.value
        if value is None or value == "" or value == b"":
            return []
        if isinstance(value, bytes | bytearray):
            data = bytes(value)
            if vr in _BYTES_VRS or vr is None:
                blobs, texts = _binary_texts(data, utf16=vr in _UTF16_VRS or vr is None)
                for blob in blobs:
                    for kind in dict.fromkeys(identity.in_bytes(blob)):
                        findings.append(Finding(name, kind, self._label(tag, where)))
                return texts
            if data.isascii():
                return [data.decode("ascii").strip(" \0")]
            try:
                value = ds[tag].value
            except Exception:  # noqa: BLE001 - searched as Latin-1 instead
                return [data.decode("latin-1")]
            read = ("\\".join(str(v) for v in value if v is not None)
                    if isinstance(value, MultiValue | list) else str(value))
            return [read, *_other_readings(data, read)]
        if isinstance(value, MultiValue | list):
            return ["\\".join(str(v) for v in value if v is not None)]
        return [str(value)]

    @staticmethod
    def _label(tag: BaseTag, where: str) -> str:
        keyword = keyword_for_tag(tag)
        return f"{where}({tag.group:04X},{tag.element:04X})" + (f" {keyword}" if keyword else "")

    @staticmethod
    def _temporal(identity: SourceIdentity, path: tuple[int, ...], vr: str, texts: list[str],
                  name: str, label: str, findings: list[Finding]) -> None:
        source = identity.temporal.get(path)
        if source is None or source[1] in DUMMY_TEMPORAL:
            return
        value = "\\".join(t.strip(" \0") for t in texts)
        if value != source[1]:
            return
        if vr == "TM" and KEEP_TIMES in identity.keep:
            return
        if vr in ("DA", "DT") and KEEP_DATES in identity.keep:
            return
        findings.append(Finding(name, {"DA": "original date", "DT": "original date-time",
                                       "TM": "original time"}[vr], label))

    def _documents(self, ds: Dataset, identity: SourceIdentity, name: str,
                   findings: list[Finding]) -> None:
        """Encapsulated documents: PDF text, other text documents as text."""
        if "EncapsulatedDocument" not in ds:
            return
        data = bytes(ds.EncapsulatedDocument or b"")
        mime = str(ds.get("MIMETypeOfEncapsulatedDocument", "") or "")
        if mime == "application/pdf" or data.startswith(b"%PDF"):
            findings.extend(self.check_pdf(data, identity, name, "encapsulated PDF"))
        else:
            text = data.decode("utf-8", "replace")
            for kind in dict.fromkeys(identity.in_text(text)):
                findings.append(Finding(name, kind, "encapsulated document text"))

    def _ocr_pixels(self, ds: Dataset, identity: SourceIdentity, name: str, what: str,
                    findings: list[Finding]) -> None:
        try:
            frames = as_shown(ds, decode_pixels(ds))
        except Exception as exc:  # noqa: BLE001 - pixels we cannot read cannot be shown safe
            findings.append(Finding(name, "pixels that cannot be decoded", type(exc).__name__))
            return
        self._ocr_frames(frames, identity, name, what, findings, through_window(ds, frames[0]))

    def _ocr_frames(self, frames: np.ndarray, identity: SourceIdentity, name: str, what: str,
                    findings: list[Finding], windowed: np.ndarray | None = None) -> None:
        count = frames.shape[0]
        images = [(f"{what}, frame {i + 1}", frames[i]) for i in sorted({0, count // 2,
                                                                          count - 1})]
        overview = _grey(frames[0])
        if count > 1:
            grey = np.stack([_grey(frames[i]) for i in range(count)])
            light = float(np.median(grey[0])) >= 128
            overview = grey.min(axis=0) if light else grey.max(axis=0)
            images.append((f"{what}, all frames", overview))
        if count > 3:  # what one frame shows and the others do not (a speckled loop)
            usual = np.percentile(grey, 50, axis=0)
            apart = (usual - grey.min(axis=0)) if light else (grey.max(axis=0) - usual)
            images.append((f"{what}, what shows on some frames only", _grey(apart)))
        images += [(f"{what}, turned a quarter", np.rot90(overview, turns))
                   for turns in (1, 3)]  # text written up or down the side
        if windowed is not None:
            images.append((f"{what}, frame 1 through its window", windowed))
        reader = self.reader()
        with ThreadPoolExecutor(max_workers=_OCR_WORKERS) as pool:
            read = list(pool.map(lambda image: reader.lines(_grey(image)),
                                 [image for _, image in images]))
        for (where, _image), lines in zip(images, read, strict=True):
            for line in lines:
                kinds = identity.in_line(line)
                words = [normalised(w) for w in line]
                labels = [w for w in words if w in SCREEN_LABELS]
                if labels and len(words) > len(labels):
                    kinds.append(f"identifier label ({labels[0]}) with a value")
                for kind in dict.fromkeys(kinds):
                    findings.append(Finding(name, kind, f"OCR of {where}"))

    def _ocr_graphics(self, ds: Dataset, identity: SourceIdentity, name: str,
                      findings: list[Finding]) -> None:
        for index, icon in enumerate(ds.get("IconImageSequence", None) or []):
            if "PixelData" not in icon:
                continue
            icon_ds = Dataset()
            icon_ds.update(icon)
            icon_ds.file_meta = ds.file_meta
            self._ocr_pixels(icon_ds, identity, name, f"icon image {index + 1}", findings)
        for group in range(0x6000, 0x6020, 2):
            if Tag(group, 0x3000) not in ds:
                continue
            try:
                planes = np.asarray(ds.overlay_array(group), dtype=np.uint8)
            except Exception as exc:  # noqa: BLE001
                findings.append(Finding(name, "overlay that cannot be read", type(exc).__name__))
                continue
            planes = planes if planes.ndim == 3 else planes[np.newaxis, ...]
            self._ocr_frames(planes * 255, identity, name, f"overlay {group:04X}", findings)

    # -- other kinds of output ---------------------------------------------------------------

    def check_pdf(self, data: bytes, identity: SourceIdentity, name: str,
                  what: str = "PDF") -> list[Finding]:
        """Findings in a PDF: its text, metadata and raw bytes."""
        findings = [Finding(name, kind, f"raw bytes of {what}")
                    for kind in dict.fromkeys(identity.in_bytes(data))]
        try:
            from pypdf import PdfReader

            reader = PdfReader(io.BytesIO(data))
            texts = [page.extract_text() or "" for page in reader.pages]
            texts += [str(v) for v in (reader.metadata or {}).values()]
        except Exception as exc:  # noqa: BLE001 - an unreadable PDF cannot be shown safe
            return [*findings, Finding(name, "unreadable PDF", type(exc).__name__)]
        for text in texts:
            for kind in dict.fromkeys(identity.in_text(text)):
                findings.append(Finding(name, kind, f"text of {what}"))
        return findings

    def check_image(self, data: bytes, identity: SourceIdentity, name: str,
                    text_prone: bool = True) -> list[Finding]:
        """Findings in a PNG or JPEG: metadata (text chunks, comments, EXIF), raw bytes and,
        with OCR, its pixels."""
        from PIL import Image

        findings = [Finding(name, kind, "raw bytes of the image")
                    for kind in dict.fromkeys(identity.in_bytes(data))]
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # noqa: BLE001
            return [*findings, Finding(name, "unreadable image", type(exc).__name__)]
        metadata = [str(v) for v in image.info.values()]
        metadata += [str(v) for v in image.getexif().values()]
        for text in metadata:
            for kind in dict.fromkeys(identity.in_text(text)):
                findings.append(Finding(name, kind, "image metadata"))
        if self.ocr == OCR_ALWAYS or (self.ocr == OCR_AUTO and text_prone):
            self._ocr_frames(np.asarray(image.convert("RGB"))[np.newaxis, ...], identity,
                             name, "image", findings)
        return findings

    def check_video(self, data: bytes, identity: SourceIdentity, name: str,
                    text_prone: bool = True) -> list[Finding]:
        """Findings in an MP4: container and stream metadata, raw bytes and, with OCR, its
        first, middle and last frames."""
        import av

        findings = [Finding(name, kind, "raw bytes of the video")
                    for kind in dict.fromkeys(identity.in_bytes(data))]
        try:
            with av.open(io.BytesIO(data)) as container:
                texts = [str(v) for v in container.metadata.values()]
                for stream in container.streams:
                    texts += [str(v) for v in stream.metadata.values()]
                frames = [f.to_ndarray(format="rgb24")
                          for f in container.decode(video=0)]  # type: ignore[union-attr]  # read
        except Exception as exc:  # noqa: BLE001
            return [*findings, Finding(name, "unreadable video", type(exc).__name__)]
        for text in texts:
            for kind in dict.fromkeys(identity.in_text(text)):
                findings.append(Finding(name, kind, "video metadata"))
        if frames and (self.ocr == OCR_ALWAYS or (self.ocr == OCR_AUTO and text_prone)):
            self._ocr_frames(np.stack(frames), identity, name, "video", findings)
        return findings

    def check_name(self, name: str, identity: SourceIdentity) -> list[Finding]:
        """Findings in a file or folder name (each part of the path)."""
        findings = []
        for part in PurePosixPath(name.replace("\\", "/")).parts:
            stem = part.rsplit(".", 1)[0] if "." in part else part
            for kind in dict.fromkeys(identity.in_text(stem)):
                findings.append(Finding(name, kind, "file or folder name"))
        return findings

    def check_data(self, data: bytes, identity: SourceIdentity, name: str,
                   text_prone: bool = True) -> list[Finding]:
        """Findings in one output file's bytes, whatever it is (by its content)."""
        findings = self.check_name(name, identity)
        if data[128:132] == b"DICM" or name.lower().endswith(".dcm") or (
                PurePosixPath(name).name.upper() == "DICOMDIR"):
            return findings + self.check_dicom(io.BytesIO(data), identity, name, text_prone)
        if data.startswith(b"%PDF"):
            return findings + self.check_pdf(data, identity, name)
        if data.startswith((b"\x89PNG", b"\xff\xd8")):
            return findings + self.check_image(data, identity, name, text_prone)
        if data[4:8] == b"ftyp":
            return findings + self.check_video(data, identity, name, text_prone)
        if data.startswith(b"PK\x03\x04"):
            return findings + self.check_zip(io.BytesIO(data), identity, name, text_prone)
        text = data.decode("utf-8", "replace")
        findings += [Finding(name, kind, "file contents")
                     for kind in dict.fromkeys(identity.in_text(text) + identity.in_bytes(data))]
        return findings

    def check_zip(self, stream: BinaryIO, identity: SourceIdentity, name: str,
                  text_prone: bool = True, password: str = "") -> list[Finding]:
        """Findings in a ZIP: its comment, every member's name, comment and extra field, and
        every member's contents."""
        findings: list[Finding] = []
        try:
            archive = _open_zip(stream, password)
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            return [Finding(name, "unreadable zip", type(exc).__name__)]
        with archive:
            for kind in dict.fromkeys(identity.in_bytes(archive.comment)
                                      + identity.in_text(archive.comment.decode("latin-1"))):
                findings.append(Finding(name, kind, "zip comment"))
            for info in archive.infolist():
                member = f"{name}!{info.filename}"
                extra = info.comment + info.extra
                for kind in dict.fromkeys(identity.in_bytes(extra)):
                    findings.append(Finding(member, kind, "zip member comment or extra field"))
                if info.is_dir():
                    findings += self.check_name(info.filename, identity)
                    continue
                try:
                    data = archive.read(info)
                except (RuntimeError, zipfile.BadZipFile, OSError) as exc:
                    findings.append(Finding(member, "unreadable zip member", type(exc).__name__))
                    continue
                found = self.check_data(data, identity, info.filename, text_prone)
                findings += [Finding(f"{name}!{f.file}", f.kind, f.where) for f in found]
        return findings

    def check_container(self, path: Path, identity: SourceIdentity) -> list[Finding]:
        """Findings in what wraps already verified files: a ZIP's comment and member names
        and comments, a folder's file and folder names, a DICOMDIR."""
        findings: list[Finding] = []
        if path.is_dir():
            for file in _files(path):
                relative = file.relative_to(path).as_posix()
                findings += self.check_name(relative, identity)
                if file.name.upper() == "DICOMDIR":
                    with open(file, "rb") as fp:
                        findings += self.check_dicom(fp, identity, relative)
            return findings
        findings += self.check_name(path.name, identity)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for kind in dict.fromkeys(identity.in_bytes(archive.comment)):
                    findings.append(Finding(path.name, kind, "zip comment"))
                for info in archive.infolist():
                    member = f"{path.name}!{info.filename}"
                    findings += self.check_name(info.filename, identity)
                    for kind in dict.fromkeys(identity.in_bytes(info.comment + info.extra)):
                        findings.append(Finding(member, kind, "zip member comment or extra"))
                    if PurePosixPath(info.filename).name.upper() == "DICOMDIR" and not (
                            info.flag_bits & 0x1):
                        findings += self.check_data(archive.read(info), identity, member)
        return findings

    def check_path(self, path: Path, identity: SourceIdentity, text_prone: bool = True,
                   password: str = "") -> list[Finding]:
        """Findings in an export on disk: a folder (every file, names included), a ZIP, or a
        single file."""
        findings: list[Finding] = []
        if path.is_dir():
            for file in _files(path):
                relative = file.relative_to(path).as_posix()
                if zipfile.is_zipfile(file) and not relative.lower().endswith(".dcm"):
                    with open(file, "rb") as fp:
                        findings += self.check_zip(fp, identity, relative, text_prone,
                                                   password)
                    findings += self.check_name(relative, identity)
                    continue
                findings += self.check_data(file.read_bytes(), identity, relative, text_prone)
            return findings
        if zipfile.is_zipfile(path):
            with open(path, "rb") as fp:
                return self.check_name(path.name, identity) + self.check_zip(
                    fp, identity, path.name, text_prone, password)
        return self.check_data(path.read_bytes(), identity, path.name, text_prone)


_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_MISPLACED_META = "file meta element (group 0002) inside the data set"
_NESTED_PIXELS = "pixel data inside a sequence item"
_AFTER_THE_IMAGE = "data after the image in the pixel data"
_NOT_OFFSETS = "data other than frame offsets in the basic offset table"
_KEPT_DOCUMENT = "document left in the data set"
_SOUND = "recorded sound (cannot be checked)"
_MISPLACED_OVERLAY = "overlay data outside the overlay groups (6000-601E, top level)"
# Recorded sound: the audio waveform SOP classes, and waveforms sampled as mu-law or A-law.
_AUDIO_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.9.4.1",
                                "1.2.840.10008.5.1.4.1.1.9.4.2"})
_AUDIO_INTERPRETATIONS = frozenset({"MB", "AB"})
_SOP_CLASS_UID, _SAMPLE_INTERPRETATION, _WAVEFORM_DATA = 0x00080016, 0x54001006, 0x54001010
_ICON_IMAGE_SEQUENCE = 0x00880200  # read with OCR instead
_ENCAPSULATED_DOCUMENT, _HPGL_DOCUMENT = 0x00420011, 0x00686300
# Kinds of identifier that, as a whole coded string value (three characters or more), are a
# finding: words of the names of anyone named, the institution's words.
_NAMED_KINDS = {"patient name", "person name", "institution"}
# Defined terms that are also words names may hold (a person called Text): not a finding as
# a whole coded value (SR value and relationship types, Image Type values).
_DEFINED_TERMS = frozenset({
    "TEXT", "CODE", "NUM", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME", "COMPOSITE", "IMAGE",
    "WAVEFORM", "SCOORD", "SCOORD3D", "TCOORD", "CONTAINER", "TABLE", "CONTAINS", "SEPARATE",
    "CONTINUOUS", "COMPLETE", "PARTIAL", "VERIFIED", "UNVERIFIED", "ORIGINAL", "DERIVED",
    "PRIMARY", "SECONDARY", "AXIAL", "LOCALIZER", "OTHER", "NONE", "YES", "MIXED", "VOLUME",
})
# UTF-16 text (Latin-1 characters, big or little endian) in binary values: runs of at least
# four characters (a fixed pattern, never built from data)
_UTF16_BE = re.compile(rb"(?:\x00[\x20-\x7e\xa0-\xff]){4,}")
_UTF16_LE = re.compile(rb"(?:[\x20-\x7e\xa0-\xff]\x00){4,}")
_MAX_INFLATED = 64 << 20
# Binary values read for UTF-16 text too: bytes and words (a LUT or waveform kept as it is can
# carry a name written two bytes a letter as well as one)
_UTF16_VRS = {"OB", "OW", "UN"}
# The single-byte code pages text is typed in at modalities and RIS terminals whatever the
# file (or its sequence item) declares (Windows, DOS, KOI8, ISO 8859 parts, Mac): a name typed
# in Windows-1251 in a file that declares ISO 8859-5 reads as other letters as declared. Raw
# bytes are searched for names in them (:meth:`SourceIdentity.in_bytes`); values that pydicom
# reads (big endian, deflated files) are also read in each.
_CHARSET_TAG = 0x00080005
# Concepts of report content items that hold the birth date: TID 1007 Subject Birth Date, and
# its SNOMED CT and LOINC equivalents.
_BIRTH_DATE_CONCEPTS = frozenset({("DCM", "121031"), ("SCT", "184099003"),
                                  ("SRT", "184099003"), ("LN", "21112-8")})
_CONCEPT_NAME = 0x0040A043
_BIRTH_DATE_VALUES = (0x0040A121, 0x0040A120)  # Date, DateTime
_BIRTH_DATE_ITEM = "birth date in a report (moved or not)"
# Concepts (DCM codes) of report content items whose text says who someone is, where they work
# or which device made the report (PS3.16): TID 1003 Person Observer (login, identifier
# within the role, organisation), TID 1004 Device Observer (name, serial number, location,
# AE title), TID 1005 Procedure Context (placer, filler and accession numbers and their
# issuers), TID 1007 Subject ID, TID 1009/8001/8002 specimen, container and parent specimen
# identifiers and their issuers, TID 1010 Device Subject (name, serial number, location),
# TID 1020/1021 Person and Device Participant (ID, issuer, organisation, device name and
# serial number); with what a profile may keep of them (None: nothing). Such text is a
# finding unless it is a placeholder or a fetus's label (a Subject ID in TID 1008), whether
# or not it holds an identifier of the source: a login or an organisation is often named
# nowhere else.
_IDENTITY_CONCEPTS: dict[str, str | None] = {
    "128774": None, "128775": None, "121030": None, "113871": None, "121020": None,
    "121021": None, "121022": None, "121041": None, "121040": None, "111700": None,
    "111705": None,
    "121009": KEEP_INSTITUTION, "113872": KEEP_INSTITUTION, "113873": KEEP_INSTITUTION,
    "110190": KEEP_INSTITUTION, "111724": KEEP_INSTITUTION, "111706": KEEP_INSTITUTION,
    "121017": KEEP_INSTITUTION, "121197": KEEP_INSTITUTION,
    "121013": KEEP_DEVICE, "121016": KEEP_DEVICE, "110119": KEEP_DEVICE, "113877": KEEP_DEVICE,
    "113880": KEEP_DEVICE, "121193": KEEP_DEVICE, "121196": KEEP_DEVICE,
}
_SUBJECT_ID = "121030"
# A Fetus Number, the Subject Class Fetus, Mother of fetus or Number of Fetuses among a
# Subject ID (TID 1008), or a section about one fetus holding it (TID 5000, 5220: Fetal
# Biometry, ..., Fetus Summary): the Subject ID is the fetus's label ("Fetus A"), which names
# no one.
_FETUS_CONCEPTS = frozenset({("DCM", "121037"), ("DCM", "121026"), ("DCM", "121036"),
                             ("DCM", "121038"), ("LN", "11878-6")})
_FETAL_SECTIONS = frozenset(("DCM", c) for c in (
    "125001", "125002", "125003", "125004", "125006", "125008", "125009", "125015", "125016"))
_CONTENT_SEQUENCE = 0x0040A730
_CONCEPT_CODE = 0x0040A168
_TEXT_VALUE = 0x0040A160
# Labels (besides every AE title) that say which machine or which local concept: station
# names, and the value and meaning of a code that is not the standard's (standard ones are
# not read). Checked for the institution or department named as labels write names
# (``STMARYS_CT1``; see :meth:`SourceIdentity.in_label`).
_LABEL_TAGS = frozenset({0x00081010, 0x00400242, 0x00400010, CODE_VALUE, CODE_MEANING,
                         0x00080119})
_PLACEHOLDER_TEXTS = frozenset({"", "ANONYMOUS", "ANON", "REMOVED", "UNKNOWN", "*"})
_IDENTITY_ITEM = "identifying text in a report (an observer, subject, organisation or device)"


def _other_readings(data: bytes, read: str) -> list[str]:
    """``data`` (a stored value) read in :data:`SINGLE_BYTE_ENCODINGS`, each reading that
    differs from ``read`` (how it was read already); none when ``data`` is 7-bit (the same in
    each) or valid UTF-8 beyond ASCII (text in those code pages never is)."""
    if data.isascii():
        return []
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        return []
    readings = dict.fromkeys(data.decode(encoding, "ignore")
                             for encoding in SINGLE_BYTE_ENCODINGS)
    readings.pop(read, None)
    return list(readings)


def _item_encodings(path: tuple[int, ...], charsets: dict[tuple[int, ...], list[str]],
                    default: list[str]) -> list[str]:
    """The character set that applies to the element at ``path``: that of the nearest item
    (the element's own, or an enclosing one) that declares Specific Character Set, else the
    data set's (PS3.5 6.1.2.5.1: an item may declare its own)."""
    item = path[:-1]
    while item:
        if item in charsets:
            return charsets[item]
        item = item[:-2]
    return default


def _nested_pixels(item_path: tuple[int, ...]) -> bool:
    """True when pixel data in the item at ``item_path`` ((sequence tag, index) pairs; empty
    at the top level) is an image nested where the de-identifier removes it: in any sequence
    item but the Icon Image Sequence's (read with OCR)."""
    return len(item_path) >= 2 and item_path[-2] != _ICON_IMAGE_SEQUENCE


def _misplaced_overlay(tag: int, depth: int) -> bool:
    """True for overlay data (60xx,3000) that no viewer shows: in a sequence item, or in a
    group beyond the sixteen overlay groups (6000-601E, even)."""
    group = tag >> 16
    if group & 0xFF00 != 0x6000 or tag & 0xFFFF != 0x3000:
        return False
    return group % 2 == 0 and (depth > 0 or group > 0x601E)


def _curve_audio(tag: int) -> bool:
    """True for the retired Audio Sample Data of a curve group (50xx,200C): sound."""
    return (tag >> 16) & 0xFF00 == 0x5000 and (tag >> 16) % 2 == 0 and tag & 0xFFFF == 0x200C


def _sound(sop_class: str, interpretations: list[str], has_waveform_data: bool) -> bool:
    """True when an output carries recorded sound: waveform data of an audio SOP class or
    sampled as mu-law or A-law (a dictation may speak the patient's name)."""
    return has_waveform_data and (
        sop_class.strip(" \0") in _AUDIO_SOP_CLASSES
        or any(i.strip(" \0").upper() in _AUDIO_INTERPRETATIONS for i in interpretations))


def _kept_document(tag: int, depth: int) -> bool:
    """True for a document the de-identifier removes where it is: an HPGL document anywhere,
    an Encapsulated Document in a sequence item (a top-level one is read as a document)."""
    return tag == _HPGL_DOCUMENT or (tag == _ENCAPSULATED_DOCUMENT and depth > 0)


def _inflated(data: bytes) -> bytes:
    """What a zlib- or gzip-compressed value inflates to (at most 64 MiB); empty when it is
    not one."""
    if data[:2] == b"\x1f\x8b":
        wbits = 31
    elif len(data) > 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0:
        wbits = 15
    else:
        return b""
    try:
        return zlib.decompressobj(wbits).decompress(data, _MAX_INFLATED)
    except zlib.error:
        return b""


def _binary_texts(data: bytes, utf16: bool) -> tuple[list[bytes], list[str]]:
    """What to search in a binary value: its bytes and, when it is compressed, what it
    inflates to; and their text: as Latin-1 and (``utf16``: OB, OW and UN values) their UTF-16
    runs, big and little endian, decoded (where each letter would otherwise be a word)."""
    blobs = [data]
    inflated = _inflated(data)
    if inflated:
        blobs.append(inflated)
    texts = []
    for blob in blobs:
        texts.append(blob.decode("latin-1"))
        if utf16:
            for pattern, encoding in ((_UTF16_BE, "utf-16-be"), (_UTF16_LE, "utf-16-le")):
                runs = [m.group().decode(encoding) for m in pattern.finditer(blob)]
                if runs:
                    texts.append("\n".join(runs))
    return blobs, texts


def _birth_dates_left(elements: list[rawdicom.RawElement]) -> list[rawdicom.RawElement]:
    """The dates of report content items whose concept is the birth date (see
    :data:`_BIRTH_DATE_CONCEPTS`) that are not a dummy: moved or not, a birth date gives the
    age to the day next to the study's date, and no option keeps it."""
    concepts: dict[tuple[int, ...], dict[int, str]] = {}
    dates: list[rawdicom.RawElement] = []
    for element in elements:
        path, tag = element.path, element.tag
        # Only the few small values looked at are decoded (not documents or pixels).
        if len(path) >= 3 and path[-3] == _CONCEPT_NAME and tag in (CODE_VALUE, CODING_SCHEME):
            concepts.setdefault(path[:-3], {})[tag] = _stripped(element.value)
        elif tag in _BIRTH_DATE_VALUES and len(path) > 1 \
                and _stripped(element.value) not in DUMMY_TEMPORAL:
            dates.append(element)
    left = []
    for element in dates:
        code = concepts.get(element.path[:-1], {})
        if (code.get(CODING_SCHEME, ""), code.get(CODE_VALUE, "")) in _BIRTH_DATE_CONCEPTS:
            left.append(element)
    return left


def _identity_texts_left(elements: list[rawdicom.RawElement], keep: frozenset[str]
                         ) -> list[rawdicom.RawElement]:
    """The text values of report content items whose concept is one of
    :data:`_IDENTITY_CONCEPTS` (and not kept by ``keep``) that are not a placeholder nor a
    fetus's label."""
    concepts: dict[tuple[int, ...], dict[int, str]] = {}
    codes: dict[tuple[int, ...], dict[int, str]] = {}  # concept names and concept codes
    texts: list[rawdicom.RawElement] = []
    for element in elements:
        path, tag = element.path, element.tag
        if len(path) >= 3 and path[-3] == _CONCEPT_NAME and tag in (CODE_VALUE, CODING_SCHEME):
            concepts.setdefault(path[:-3], {})[tag] = _stripped(element.value)
        if len(path) >= 4 and path[-3] in (_CONCEPT_NAME, _CONCEPT_CODE) \
                and tag in (CODE_VALUE, CODING_SCHEME):
            codes.setdefault(path[:-1], {})[tag] = _stripped(element.value)
        elif tag == _TEXT_VALUE and len(path) > 1 and _not_placeholder(element.value):
            texts.append(element)
    fetal: set[tuple[int, ...]] = set()  # sequences that are a fetus's subject context
    for code_path, code in codes.items():
        scheme_value = (code.get(CODING_SCHEME, ""), code.get(CODE_VALUE, ""))
        if scheme_value in _FETUS_CONCEPTS:
            fetal.add(code_path[:-3])
        elif scheme_value in _FETAL_SECTIONS and code_path[-2] == _CONCEPT_NAME:
            fetal.add((*code_path[:-2], _CONTENT_SEQUENCE))
    left = []
    for element in texts:
        item = concepts.get(element.path[:-1], {})
        value = item.get(CODE_VALUE, "")
        if value == _SUBJECT_ID and element.path[:-2] in fetal:
            continue
        if _identity_concept(item.get(CODING_SCHEME, ""), value, keep):
            left.append(element)
    return left


def _not_placeholder(value: Any) -> bool:
    """True when ``value`` (a text value, stored or read) is not a placeholder and has more
    than two letters or digits (a fetus's ID ``A`` or ``2`` names no one)."""
    text = value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value or "")
    text = text.strip(" \0")
    return text.upper() not in _PLACEHOLDER_TEXTS and sum(c.isalnum() for c in text) > 2


def _identity_concept(scheme: str, value: str, keep: frozenset[str]) -> bool:
    """True when the concept (``scheme``, ``value``) is one of :data:`_IDENTITY_CONCEPTS`
    that ``keep`` does not keep."""
    if scheme != "DCM" or value not in _IDENTITY_CONCEPTS:
        return False
    kept_by = _IDENTITY_CONCEPTS[value]
    return kept_by is None or kept_by not in keep


def _identity_item(ds: Dataset, keep: frozenset[str], fetal: bool = False) -> bool:
    """True when ``ds`` (a sequence item) is a report content item of one of
    :data:`_IDENTITY_CONCEPTS` (not kept by ``keep``) whose text is not a placeholder, nor a
    fetus's label (a Subject ID among a fetus's subject context, ``fetal``)."""
    if "TextValue" not in ds or "ConceptNameCodeSequence" not in ds:
        return False
    try:
        concepts = ds.ConceptNameCodeSequence or []
        return _not_placeholder(ds.TextValue) and any(
            _identity_concept(str(c.get("CodingSchemeDesignator", "") or "").strip(),
                              str(c.get("CodeValue", "") or "").strip(), keep)
            and not (fetal and str(c.get("CodeValue", "") or "").strip() == _SUBJECT_ID)
            for c in concepts)
    except Exception:  # noqa: BLE001 - unreadable: its elements are read one by one instead
        return False


def _fetus_context(items: Any) -> bool:
    """True when the content items ``items`` are a fetus's subject context (TID 1008: a
    Fetus Number or the Subject Class Fetus among them)."""
    try:
        for item in items:
            for concept in list(item.get("ConceptNameCodeSequence") or []) + list(
                    item.get("ConceptCodeSequence") or []):
                if _scheme_and_value(concept) in _FETUS_CONCEPTS:
                    return True
    except Exception:  # noqa: BLE001 - unreadable: not a fetus's context
        return False
    return False


def _fetal_section(item: Dataset) -> bool:
    """True when the content item ``item`` is a section about one fetus (its content is
    that fetus's context)."""
    try:
        return any(_scheme_and_value(c) in _FETAL_SECTIONS
                   for c in item.get("ConceptNameCodeSequence") or [])
    except Exception:  # noqa: BLE001 - unreadable: not a fetus's section
        return False


def _scheme_and_value(concept: Dataset) -> tuple[str, str]:
    return (str(concept.get("CodingSchemeDesignator", "") or "").strip(),
            str(concept.get("CodeValue", "") or "").strip())


def _stripped(value: bytes) -> str:
    return value.decode("latin-1").strip(" \0")


def _birth_date_item(ds: Dataset) -> bool:
    """True when ``ds`` (a sequence item) is a report content item whose concept is the
    birth date and whose date or date-time is not a dummy."""
    concepts = ds.get("ConceptNameCodeSequence") or []
    if not any((str(c.get("CodingSchemeDesignator", "") or "").strip(),
                str(c.get("CodeValue", "") or "").strip()) in _BIRTH_DATE_CONCEPTS
               for c in concepts):
        return False
    return any(str(ds.get(keyword, "") or "").strip(" \0") not in DUMMY_TEMPORAL
               for keyword in ("Date", "DateTime"))


def _standard_items(elements: list[rawdicom.RawElement], encodings: list[str]
                    ) -> set[tuple[int, ...]]:
    """The paths of the items that are standard code items (see
    :func:`imageshare.verify.codes.standard_code`)."""
    items: dict[tuple[int, ...], dict[int, str]] = {}
    for element in elements:
        if element.tag in CODE_TAGS and len(element.path) > 1:
            value = element.value
            text = value.decode("ascii") if value.isascii() else _decode(value, encodings,
                                                                          element.vr)
            items.setdefault(element.path[:-1], {})[element.tag] = text
    return {path for path, code in items.items()
            if standard_code(code.get(CODING_SCHEME, ""), code.get(CODE_VALUE, ""),
                             code.get(CODE_MEANING, ""))}


def _standard_item(ds: Dataset) -> bool:
    """True when ``ds`` (a sequence item) is a standard code item."""
    try:
        return standard_code(str(ds.get("CodingSchemeDesignator", "") or ""),
                             str(ds.get("CodeValue", "") or ""),
                             str(ds.get("CodeMeaning", "") or ""))
    except Exception:  # noqa: BLE001 - unreadable: read element by element instead
        return False


def _kinds_in(identity: SourceIdentity, text: str, vr: str | None, tag: int = 0) -> list[str]:
    """The kinds of identifier in one element's ``text`` (of attribute ``tag``), read as its
    VR says: numbers (IS, DS) without short identifiers but with the source's dates, coded
    strings (CS) for the patient and as whole values for anyone's name, UIDs for the
    source's dates in them, labels (:data:`_LABEL_TAGS`, AE titles) for the institution or
    department named as labels write names."""
    if vr in ("IS", "DS"):
        return _numeric_kinds(identity, text)
    kinds = identity.in_text(text, coded=vr == "CS", dates=vr not in _NOT_WRITTEN_DATES)
    if vr == "CS":
        kinds += _coded_names(identity, text)
    elif vr == "UI":
        kinds += [kind for uid in text.split("\\") for kind in identity.in_uid(uid.strip())]
    if vr == "AE" or tag in _LABEL_TAGS:
        kinds += [f"{kind} in a label" for kind in identity.in_label(text)]
    return kinds


def _numeric_kinds(identity: SourceIdentity, text: str) -> list[str]:
    """Identifiers in an IS or DS value: not those shorter than five characters (a patient ID
    400 is not found in a window width of 400), and the source's dates as ``YYYYMMDD``
    (``20240315``, ``20240315.1015``)."""
    kinds = identity.in_text(text, dates=False)
    if kinds:
        words = words_of(text)
        short = {w for w in words if len(w) < 5 and w in identity.tokens}
        if short:
            kinds = identity.in_text(" ".join(w for w in words if w not in short),
                                     dates=False)
    kinds += [kind for (year, month, day), kind in identity.dates.items()
              if day and f"{year:04d}{month:02d}{day:02d}" in text]
    return kinds


def _coded_names(identity: SourceIdentity, text: str) -> list[str]:
    """Values of a coded string that are, as a whole, a word (three characters or more) of
    the name of anyone named or of the institution (defined terms are words too, so no less
    than a whole value counts)."""
    kinds = []
    for value in text.split("\\"):
        norm = normalised(value)
        token = identity.tokens.get(norm) if len(norm) >= 3 else None
        if norm in _DEFINED_TERMS:
            continue
        if token is not None and token.kind in _NAMED_KINDS:
            kinds.append(token.kind)
    return kinds


def _misplaced_file_meta(elements: list[rawdicom.RawElement]) -> list[rawdicom.RawElement]:
    """Group 0002 elements that are not the file meta group at the start of the file: at the
    top level after the data set began, or in a sequence item (PS3.10 allows them in the file
    meta group only)."""
    misplaced = []
    in_meta = True
    for element in elements:
        group = element.tag >> 16
        if in_meta and group == 0x0002 and len(element.path) == 1:
            continue
        in_meta = False
        if group == 0x0002:
            misplaced.append(element)
    return misplaced


def _mapped(stream: BinaryIO) -> Any:
    """The stream's bytes: mapped into memory for a file (pages read only where looked at, so
    native pixel data is never read), the bytes themselves otherwise."""
    import mmap

    stream.seek(0)
    try:
        fileno = stream.fileno()
        if os.fstat(fileno).st_size:
            return mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        pass
    return stream.read()


def _encodings(charset: bytes) -> list[str]:
    from pydicom.charset import convert_encodings

    values = [v.strip() for v in charset.decode("latin-1").strip(" \0").split("\\")]
    try:
        return convert_encodings(values or [""])
    except Exception:  # noqa: BLE001 - unknown: decoded as Latin-1
        return ["latin_1"]


def _decode(value: bytes, encodings: list[str], vr: str) -> str:
    from pydicom.charset import decode_bytes

    delimiters = {0x5C, 0x3D, 0x5E} if vr == "PN" else {0x5C}
    try:
        return decode_bytes(value, encodings, delimiters)
    except Exception:  # noqa: BLE001 - searched as Latin-1 instead
        return value.decode("latin-1")


def _raw_text_prone(raw: rawdicom.RawFile) -> bool:
    def text(tag: int) -> str:
        return raw.top.get(tag, b"").decode("latin-1").strip(" \0").upper()

    samples = raw.top.get(0x00280002, b"")
    return (text(0x00280301) == "YES" or text(0x00080060) in TEXT_MODALITIES
            or (len(samples) == 2 and int.from_bytes(samples, "little") > 1)
            or text(0x00080016).startswith(("1.2.840.10008.5.1.4.1.1.7",
                                             "1.2.840.10008.5.1.4.1.1.77")))


def _open_zip(stream: BinaryIO, password: str) -> zipfile.ZipFile:
    if password:
        import pyzipper

        archive: zipfile.ZipFile = pyzipper.AESZipFile(stream)
        archive.setpassword(password.encode())
        return archive
    return zipfile.ZipFile(stream)


def _files(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            yield Path(root) / name


def as_report(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings as JSON-friendly data (kinds and places only)."""
    return [f.as_dict() for f in findings]
