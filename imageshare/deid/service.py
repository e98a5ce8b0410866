"""De-identifying instances: attributes (PS3.15 profile) and burned-in text, verified, with a
report.

:class:`Deidentifier` turns one instance into its de-identified copy or holds it back. Its
:meth:`Deidentifier.write` streams a Part 10 file: the header is read and cleaned, and pixel
data that needs no cleaning is copied byte for byte from the source to the target without
being loaded (nor decoded, nor re-encoded). Every copy it writes is then checked by the
independent verifier (:mod:`imageshare.verify`) against its source; any finding holds it back.
:func:`deidentify_inputs` runs it over files, folders, zips and DICOMDIR media into an export
writer, with progress, a summary and a JSON report of what was done to each file.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from imageshare.archive.importing import DicomInputs, ImportReport
from imageshare.deid.engine import AttributeCleaner, InstanceReport, PatientContext
from imageshare.deid.frame_extras import (
    FrameUnreadable,
    Stripped,
    encapsulated_items,
    frames_of,
    is_frame_start,
    strip_extras,
)
from imageshare.deid.pixels import BurnedInTextCleaner, PixelReport, may_have_burned_in_text
from imageshare.deid.profiles import Profile
from imageshare.deid.pseudonyms import Pseudonyms
from imageshare.deid.unused_bits import StoredBits
from imageshare.verify import SourceIdentity, Verifier
from imageshare.verify.identity import keep_for_options

# Safe private attributes (PS3.15 E.3.10): (private creator, group, element offset).
SAFE_PRIVATE: frozenset[tuple[str, int, int]] = frozenset({
    ("SIEMENS MR HEADER", 0x0019, 0x0C), ("SIEMENS MR HEADER", 0x0019, 0x0D),
    ("SIEMENS MR HEADER", 0x0019, 0x0E), ("SIEMENS MR HEADER", 0x0019, 0x27),
    ("GEMS_PARM_01", 0x0043, 0x39), ("GEMS_ACQU_01", 0x0019, 0x9E),
    ("Philips MR Imaging DD 001", 0x2001, 0x03), ("Philips MR Imaging DD 001", 0x2005, 0x0E),
})
CHECK_PIXELS, TRUST_PIXELS = "check", "trust"
# Recorded sound (the Basic Voice Audio and General Audio Waveform IODs of PS3.3 A.34): a
# dictation speaks the patient's name and date of birth, which nothing here can hear. Audio is
# also any waveform sampled as mu-law or A-law (Waveform Sample Interpretation MB, AB).
AUDIO_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.9.4.1", "1.2.840.10008.5.1.4.1.1.9.4.2"})
AUDIO_INTERPRETATIONS = frozenset({"MB", "AB"})
_MAX_TRAILING = 64 * 1024 * 1024  # bytes after the pixel data that are read as attributes
_COPY_CHUNK = 1 << 20
MAX_OFFSETS = 1 << 20  # frames a basic offset table is read for (more: it is written empty)



def records_sound(ds: Dataset) -> bool:
    """True when ``ds`` carries recorded sound: an audio waveform SOP class, or a waveform
    sampled as mu-law or A-law."""
    if str(ds.get("SOPClassUID", "") or "").strip() in AUDIO_SOP_CLASSES:
        return True
    try:
        items = ds.get("WaveformSequence", None) or []
        return any(str(item.get("WaveformSampleInterpretation", "") or "").strip().upper()
                   in AUDIO_INTERPRETATIONS for item in items)
    except (TypeError, ValueError, AttributeError):
        return True  # a waveform that cannot be read cannot be shown to be no sound


def shows_recognisable_features(ds: Dataset) -> bool:
    """True when ``ds`` says its image would let someone recognise the patient
    (Recognizable Visual Features (0028,0302) YES, PS3.3 C.7.6.16): a face photograph, a
    volume rendering of the head; PS3.15 E.1 has them de-identified only by the Clean
    Recognizable Visual Features Option, which no profile here offers."""
    try:
        value = ds.get("RecognizableVisualFeatures", "")
    except (TypeError, ValueError):
        return True  # unreadable: cannot be shown to be NO
    return str(value or "").strip().upper() == "YES"


def _read_otherwise(ds: Dataset, implicit: bool) -> bool:
    """True when the elements of ``ds`` were stored in another VR encoding than ``implicit``
    says (a data set in implicit VR under an explicit VR transfer syntax: pydicom reads it,
    but its bytes cannot be copied into a file of the syntax)."""
    for tag in ds.keys():
        stored = getattr(ds.get_item(tag), "is_implicit_VR", None)  # elements still raw
        if stored is not None:
            return bool(stored) != implicit
    return False


def _with_known_vrs(ds: Dataset) -> None:
    """Give the top-level elements read without a VR (a data set stored in implicit VR under
    an explicit VR transfer syntax) their dictionary VR, so that ``ds`` can be written in the
    encoding its transfer syntax says."""
    implicit = ds.original_encoding[0]
    if implicit is None or implicit:
        return
    for tag in list(ds.keys()):
        element = ds.get_item(tag)
        if getattr(element, "VR", "") is None:
            ds[tag]  # noqa: B018 - reading it converts the raw element (VR from the dictionary)


def _encoding_of(ds: Dataset) -> tuple[bool, bool]:
    """The (implicit VR, little endian) encoding ``ds`` was read with."""
    implicit, little = ds.original_encoding
    assert implicit is not None and little is not None  # read from a file: always known
    return implicit, little

@dataclass
class Outcome:
    """One instance after de-identification: its data set (the header only when the pixel data
    was streamed), or None when held back; what the verifier needs to check derived outputs."""

    dataset: Dataset | None
    report: dict[str, Any]
    identity: SourceIdentity | None = None
    text_prone: bool = False

    @property
    def held_back(self) -> bool:
        """True when the instance must not leave (identifiers may remain)."""
        return self.dataset is None


class Deidentifier:
    """Applies a profile to instances: attributes first worked out on the original identity,
    pixels checked and cleaned, then attributes replaced; every written copy verified."""

    def __init__(self, profile: Profile, pseudonyms: Pseudonyms,
                 pixels: BurnedInTextCleaner | None = None, verifier: Verifier | None = None,
                 burned_in: str = CHECK_PIXELS) -> None:
        """``verifier`` checks what :meth:`write` writes (None: not checked, for measuring
        the engine alone). ``burned_in`` is ``check`` (images that may carry burned-in text
        are cleaned with OCR, or held back) or ``trust`` (pixel data is copied as it is: only
        for callers who know the pixels carry no text, such as attribute benchmarks)."""
        self.profile = profile
        self.attributes = AttributeCleaner(profile, pseudonyms, SAFE_PRIVATE)
        self.pixels = pixels or BurnedInTextCleaner()
        self.verifier = verifier
        self.burned_in = burned_in
        self.keep = keep_for_options(profile.options)

    # -- in memory ---------------------------------------------------------------------------

    def instance(self, ds: Dataset) -> Outcome:
        """De-identify ``ds`` in place; the outcome holds it back if it may still show the
        patient (pixels, or anything the verifier finds in the written copy)."""
        identity, text_prone = self._source(ds)
        outcome = self._deidentify(ds, has_pixels="PixelData" in ds)
        outcome.identity, outcome.text_prone = identity, text_prone
        if outcome.held_back or self.verifier is None or identity is None:
            return outcome
        buffer = io.BytesIO()
        _with_known_vrs(ds)
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        return self._verified(outcome, buffer)

    def _source(self, ds: Dataset) -> tuple[SourceIdentity | None, bool]:
        """What the verifier needs from the source (read before the engine changes it): its
        identity and whether it may carry burned-in text."""
        if self.verifier is None:
            return None, False
        return self.verifier.identity([ds], self.keep), self.verifier.text_prone(ds)

    def _deidentify(self, ds: Dataset, has_pixels: bool) -> Outcome:
        syntax = _syntax(ds)
        native = has_pixels and "PixelData" in ds and syntax is not None \
            and not syntax.is_encapsulated
        if native:
            _check_complete(ds, len(ds.PixelData))
        context = self.attributes.context(ds)
        pixel_report = self._pixels(ds, context, has_pixels, clean=True)
        excess = 0
        if native and not pixel_report.held_back:
            ds.PixelData, excess = _without_excess(ds, ds.PixelData)
        # (cleaned pixels of a big endian instance are written little endian)
        bits = StoredBits.of(ds, _syntax(ds) == ExplicitVRBigEndian) if native else None
        if bits is not None and not pixel_report.held_back:
            ds.PixelData, cleared = bits.canonical(ds.PixelData)
            if cleared:
                pixel_report.unused_bits_cleared = True
        removed = 0
        if not pixel_report.held_back and has_pixels:
            removed, reason = _strip_compressed(ds, context)
            if reason:
                pixel_report.held_back, pixel_report.reason = True, reason
        attributes = self.attributes.apply(ds, context)
        outcome = self._outcome(ds, attributes, pixel_report)
        if removed:
            outcome.report["compressed_extras_removed"] = removed
        if excess:
            outcome.report["pixel_data_after_the_image_cleared"] = excess
        return outcome

    def _pixels(self, ds: Dataset, context: PatientContext, has_pixels: bool,
                clean: bool) -> PixelReport:
        """Burned-in text and overlays; with ``clean`` False only what needs no decoding."""
        report = PixelReport()
        if "EncapsulatedDocument" in ds:
            report.held_back = True
            report.reason = ("encapsulated documents (PDF, CDA, ...) cannot be de-identified "
                             "automatically")
            return report
        if records_sound(ds):
            report.held_back = True
            report.reason = ("recorded sound (a dictation may speak the patient's name) cannot "
                             "be de-identified automatically")
            return report
        if has_pixels and shows_recognisable_features(ds):
            report.held_back = True
            report.reason = ("the image shows recognisable features (a face, a tattoo, a "
                             "surface rendering; Recognizable Visual Features is YES): no "
                             "profile here removes them")
            return report
        if has_pixels and self.burned_in == CHECK_PIXELS and may_have_burned_in_text(
                ds, has_pixels=True):
            if not self.profile.has("clean_pixel_data"):
                report.held_back = True
                report.reason = ("the image may carry burned-in text and the profile does "
                                 "not clean pixel data")
                return report
            if clean:
                report = self.pixels.clean(ds, context.identity)
        if self.profile.has("clean_graphics") and not report.held_back:
            self.pixels.clean_overlays(ds, context.identity, report)
        return report

    def _outcome(self, ds: Dataset, attributes: InstanceReport,
                 pixel_report: PixelReport) -> Outcome:
        report = {"attributes": attributes.as_dict(), "pixels": pixel_report.as_dict(),
                  "sop_class_uid": str(ds.get("SOPClassUID", "")),
                  "new_sop_instance_uid": str(ds.get("SOPInstanceUID", ""))}
        if pixel_report.held_back:
            return Outcome(None, {**report, "held_back": True, "reason": pixel_report.reason})
        return Outcome(ds, {**report, "held_back": False})

    def _verified(self, outcome: Outcome, written: BinaryIO) -> Outcome:
        """The outcome after the verifier read the written copy: held back on any finding."""
        assert self.verifier is not None and outcome.identity is not None
        started = time.perf_counter()
        findings = self.verifier.check_dicom(written, outcome.identity, "output",
                                             outcome.text_prone)
        outcome.report["verification"] = {
            "findings": [{"kind": f.kind, "where": f.where} for f in findings],
            "seconds": time.perf_counter() - started}
        if findings:
            outcome.report["held_back"] = True
            outcome.report["reason"] = ("the verifier found identifying data in the "
                                        "de-identified copy: " + "; ".join(
                                            dict.fromkeys(str(f) for f in findings[:5])))
            outcome.dataset = None
        return outcome

    # -- streaming ---------------------------------------------------------------------------

    def write(self, source: BinaryIO, target: BinaryIO,
              prepare: Callable[[Dataset], None] | None = None) -> Outcome:
        """De-identify the Part 10 file ``source`` (seekable) into ``target`` (a readable,
        seekable staging file) and verify what was written. Pixel data that needs no cleaning
        is copied byte for byte without being loaded; ``prepare`` may add values to the
        de-identified header before it is written (DICOMDIR keys). When the outcome is held
        back, ``target`` must be discarded."""
        header = dcmread(source, stop_before_pixels=True)
        if "SOPInstanceUID" not in header:
            raise InvalidDicomError("no SOP Instance UID")
        pixel_at = source.tell()
        size = source.seek(0, os.SEEK_END)
        has_pixels = pixel_at < size
        started = time.perf_counter()
        identity, text_prone = self._source(header)
        identity_seconds = time.perf_counter() - started
        end = self._pixel_end(source, pixel_at, size, header) if has_pixels else None
        if end is not None:
            context = self.attributes.context(header)
            extras, reason = _compressed_extras(source, pixel_at, end, header, context)
            if reason:
                return Outcome(None, {"held_back": True, "reason": reason,
                                      "sop_class_uid": str(header.get("SOPClassUID", ""))})
            pixel_report = self._pixels(header, context, has_pixels, clean=False)
            if pixel_report.held_back:
                return Outcome(None, {"held_back": True, "reason": pixel_report.reason,
                                      "pixels": pixel_report.as_dict(),
                                      "sop_class_uid": str(header.get("SOPClassUID", ""))})
            trailing = self._trailing(source, end, size, header, context)
            attributes = self.attributes.apply(header, context)
            outcome = self._outcome(header, attributes, pixel_report)
            outcome.report["pixel_data"] = "copied as stored"
            if prepare:
                prepare(header)
            if extras:
                _drop_extended_offsets(header)
                _save_header(header, target)
                removed = _copy_stripped(source, pixel_at, end, header, target)
                outcome.report["pixel_data"] = "copied without the text its frames carried"
                outcome.report["compressed_extras_removed"] = removed
            else:
                _save_header(header, target)
                syntax = _syntax(header)
                if syntax is not None and not syntax.is_encapsulated:
                    outcome.report["pixel_data"] = _copy_native(source, target, pixel_at, end,
                                                                header)
                elif not _copy_encapsulated(source, target, pixel_at, end, header):
                    outcome.report["pixel_data"] = ("copied without the basic offset table "
                                                    "(it held no offsets of its frames)")
            if len(trailing):
                out = DicomFileLike(target)
                out.is_implicit_VR, out.is_little_endian = _encoding_of(header)
                write_dataset(out, trailing)
        else:
            ds = header
            deflated = _syntax(header) == DeflatedExplicitVRLittleEndian
            if has_pixels or deflated:
                source.seek(0)
                ds = dcmread(source)
            if deflated:  # the header was read to the end of the inflated stream
                has_pixels = "PixelData" in ds
            outcome = self._deidentify(ds, has_pixels)
            if outcome.held_back:
                return outcome
            if prepare:
                prepare(ds)
            _with_known_vrs(ds)
            ds.save_as(target, enforce_file_format=True)
        outcome.identity, outcome.text_prone = identity, text_prone
        if self.verifier is None or identity is None:
            return outcome
        target.flush()
        target.seek(0)
        outcome = self._verified(outcome, target)
        outcome.report["verification"]["seconds"] = round(
            outcome.report["verification"]["seconds"] + identity_seconds, 4)
        return outcome

    def _pixel_end(self, source: BinaryIO, pixel_at: int, size: int,
                   header: Dataset) -> int | None:
        """Where the pixel data ends when it can be copied as stored (None: it is read)."""
        if not self._streamable(header, True):
            return None
        try:
            end = _element_end(source, pixel_at, size, header.original_encoding)
        except InvalidDicomError:
            return None  # let pydicom read it (and refuse it if it must)
        syntax = _syntax(header)
        if syntax is not None and not syntax.is_encapsulated:
            _check_complete(header, end - pixel_at - len(_element_header(source, pixel_at,
                                                                         header)))
        return end

    def _streamable(self, header: Dataset, has_pixels: bool) -> bool:
        """True when the pixel data can be copied as stored: it needs no cleaning and the
        file is little endian, not deflated, and encoded as its transfer syntax says."""
        if self.burned_in == CHECK_PIXELS and may_have_burned_in_text(header, has_pixels) \
                and self.profile.has("clean_pixel_data"):
            return False
        meta = getattr(header, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        if syntax is None or syntax == DeflatedExplicitVRLittleEndian:
            return False
        implicit, little = header.original_encoding
        return bool(little) and implicit is not None and bool(implicit) == syntax.is_implicit_VR \
            and syntax.is_little_endian and not _read_otherwise(header, bool(implicit))

    def _trailing(self, source: BinaryIO, end: int, size: int, header: Dataset,
                  context: PatientContext) -> Dataset:
        """Attributes stored after the pixel data (padding, signatures, private tags),
        de-identified like the rest."""
        if end >= size:
            return Dataset()
        if size - end > _MAX_TRAILING:
            raise InvalidDicomError("too much data after the pixel data")
        source.seek(end)
        implicit, little = header.original_encoding
        trailing = read_dataset(io.BytesIO(source.read(size - end)), bool(implicit),
                                bool(little))
        self.attributes.apply_part(trailing, context)
        return trailing


_EMBEDDED_TEXT = ("the compressed pixel data carries text naming the patient (a JPEG or JPEG "
                  "2000 comment); review by hand")


def _strip_compressed(ds: Dataset, context: PatientContext) -> tuple[int, str]:
    """Comments, application segments and trailing bytes removed from every compressed frame
    of ``ds`` (in memory; the pixels themselves are untouched): how many were removed, and a
    reason to hold the instance back ("" when none)."""
    syntax = _syntax(ds)
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return 0, ""
    source = io.BytesIO(ds.PixelData)
    try:
        items = list(encapsulated_items(source, len(ds.PixelData)))
        if items and items[0] and not _offsets_of_frames(items[0], _item_starts(items[1:])):
            items[0] = b""  # an offset table that holds something else: an empty one
            ds.PixelData = b"".join(struct.pack("<HHL", 0xFFFE, 0xE000, len(item)) + item
                                    for item in items)
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        if len(items) < 2 or not is_frame_start(items[1]):
            return 0, ""  # RLE, video: no comment segments to strip
        stripped = [strip_extras(frame) for frame in frames_of(items[1:])]
    except FrameUnreadable as exc:
        return 0, _unreadable(exc)
    if any(context.identity.found_in(text) for one in stripped for text in _texts(one)):
        return 0, _EMBEDDED_TEXT
    removed = sum(one.removed for one in stripped)
    if removed:
        _drop_extended_offsets(ds)
        ds.PixelData = encapsulate([one.frame for one in stripped], has_bot=bool(items[0]))
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    return removed, ""


def _compressed_extras(source: BinaryIO, at: int, end: int, header: Dataset,
                       context: PatientContext) -> tuple[bool, str]:
    """Whether the encapsulated pixel data in a file (its element at ``at``) carries
    anything :func:`_strip_compressed` removes, and a reason to hold it back ("" when none);
    read one frame at a time."""
    element = _element_header(source, at, header)
    if element[-4:] != b"\xff\xff\xff\xff":
        return False, ""  # native pixel data
    try:
        items = encapsulated_items(source, end)
        next(items, None)  # the basic offset table
        fragments = iter(items)
        first = next(fragments, None)
        if first is None or not is_frame_start(first):
            return False, ""
        for frame in frames_of(itertools.chain([first], fragments)):
            one = strip_extras(frame)
            if one.changed:
                return True, ""
            if any(context.identity.found_in(text) for text in _texts(one)):
                return False, _EMBEDDED_TEXT
    except FrameUnreadable as exc:
        return False, _unreadable(exc)
    return False, ""


def _item_starts(fragments: list[bytes]) -> set[int]:
    """Where each of ``fragments`` starts, from the start of the first (as a basic offset
    table counts)."""
    starts, position = set(), 0
    for fragment in fragments:
        starts.add(position)
        position += 8 + len(fragment)
    return starts


def _offsets_of_frames(table: bytes, is_item_start: set[int] | Callable[[int], bool]) -> bool:
    """True when a basic offset table holds offsets of frames and nothing else: whole 32-bit
    values, the first 0, increasing, each the start of a fragment (PS3.5 A.4). Anything else
    it holds (text, a thumbnail) would be copied unseen."""
    if len(table) % 4:
        return False
    offsets = struct.unpack(f"<{len(table) // 4}L", table)
    starts = is_item_start.__contains__ if isinstance(is_item_start, set) else is_item_start
    return bool(offsets) and offsets[0] == 0 and all(
        b > a for a, b in itertools.pairwise(offsets)) and all(starts(o) for o in offsets)


def _copy_encapsulated(source: BinaryIO, target: BinaryIO, at: int, end: int,
                       header: Dataset) -> bool:
    """Copy the encapsulated pixel data element at ``at`` to the end of ``target`` as stored,
    but for a basic offset table that does not hold its frames' offsets (see
    :func:`_offsets_of_frames`): that one is written empty. False when it was."""
    element = _element_header(source, at, header)
    first = at + len(element)
    source.seek(first)
    group, number, length = struct.unpack("<HHL", source.read(8))
    table_end = first + 8 + length
    if (group, number) != (0xFFFE, 0xE000) or length == 0 or table_end > end:
        _copy(source, target, at, end - at)
        return True
    source.seek(first + 8)
    table = source.read(length) if length <= 4 * MAX_OFFSETS else b"\0"
    sizes = source.seek(0, os.SEEK_END)

    def is_item_start(offset: int) -> bool:
        position = table_end + offset
        if position + 8 > min(end, sizes):
            return False
        source.seek(position)
        return source.read(4) == b"\xfe\xff\x00\xe0"

    if _offsets_of_frames(table, is_item_start):
        _copy(source, target, at, end - at)
        return True
    target.seek(0, os.SEEK_END)
    target.write(element + struct.pack("<HHL", 0xFFFE, 0xE000, 0))
    _copy(source, target, table_end, end - table_end)
    return False


def _without_excess(ds: Dataset, data: bytes) -> tuple[bytes, int]:
    """Native pixel data ``data`` with whatever follows the image (bytes beyond the length
    the image attributes give, which decoders drop and no viewer shows) zeroed, and how many
    non-zero bytes were there."""
    image = get_expected_length(ds)
    excess = data[image:]
    if not excess.strip(b"\0"):
        return data, 0
    return data[:image] + bytes(len(excess)), len(excess.strip(b"\0"))


def _copy_native(source: BinaryIO, target: BinaryIO, at: int, end: int,
                 header: Dataset) -> str:
    """Copy the native pixel data element at ``at`` to the end of ``target``: the image with
    the bits outside Bits Stored made canonical, and zeros for anything after the image (see
    :func:`_without_excess`). Returns what the report says of it."""
    element = _element_header(source, at, header)
    value_at = at + len(element)
    length = end - value_at
    image = min(length, get_expected_length(header))
    target.seek(0, os.SEEK_END)
    target.write(element)
    said = "copied as stored"
    bits = StoredBits.of(header)
    if bits is not None:
        if _copy_canonical(source, target, value_at, image, bits):
            said = "copied with the bits outside Bits Stored cleared"
    else:
        _copy(source, target, value_at, image)
    done = image
    while done < length:
        source.seek(value_at + done)
        chunk = source.read(min(_COPY_CHUNK, length - done))
        if not chunk:
            raise InvalidDicomError("the source ended while its pixel data was copied")
        if chunk.strip(b"\0"):
            said = "copied with what followed the image zeroed"
        target.write(bytes(len(chunk)))
        done += len(chunk)
    return said


def _copy_stripped(source: BinaryIO, at: int, end: int, header: Dataset,
                   target: BinaryIO) -> int:
    """Copy the encapsulated pixel data element at ``at`` to the end of ``target`` with
    every frame's extras removed, one frame in memory at a time; a basic offset table
    present in the source is rebuilt for the new frame lengths. Returns how many extras
    were removed."""
    element = _element_header(source, at, header)
    first = at + len(element)

    def stripped_frames() -> Iterator[Stripped]:
        source.seek(first)
        items = encapsulated_items(source, end)
        next(items, None)
        for frame in frames_of(items):
            yield strip_extras(frame)

    source.seek(first)
    offsets = b""
    if next(encapsulated_items(source, end), b""):  # the source has offsets: new ones
        position, lengths = 0, []
        for one in stripped_frames():
            lengths.append(position)
            position += 8 + len(one.frame) + len(one.frame) % 2
        if position < 1 << 32:  # else too long for a basic offset table: none
            offsets = struct.pack(f"<{len(lengths)}L", *lengths)
    target.seek(0, os.SEEK_END)
    target.write(element)
    target.write(struct.pack("<HHL", 0xFFFE, 0xE000, len(offsets)) + offsets)
    removed = 0
    for one in stripped_frames():
        removed += one.removed
        frame = one.frame + b"\0" * (len(one.frame) % 2)
        target.write(struct.pack("<HHL", 0xFFFE, 0xE000, len(frame)) + frame)
    target.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return removed


def _element_header(source: BinaryIO, at: int, header: Dataset) -> bytes:
    """The tag, VR and length of the pixel data element at ``at`` as stored: 8 bytes in
    implicit VR, 12 in explicit VR (OB, OW or UN)."""
    source.seek(at)
    return source.read(8 if header.original_encoding[0] else 12)


def _drop_extended_offsets(ds: Dataset) -> None:
    """Remove the extended offset table: the frames' lengths have changed."""
    for tag in (0x7FE00001, 0x7FE00002):
        if tag in ds:
            del ds[tag]


def _unreadable(exc: FrameUnreadable) -> str:
    return f"a compressed frame cannot be read for text it may carry ({exc}); review by hand"


def _texts(stripped: Stripped) -> list[str]:
    """The kept segments of a frame as text, in the encodings text is written in."""
    texts = []
    for body in stripped.kept:
        texts.append(body.decode("latin-1"))
        if b"\0" in body:
            texts += [body.decode(codec, "ignore").replace("\0", " ")
                      for codec in ("utf-16-le", "utf-16-be")]
    return texts


class IncompleteInstance(InvalidDicomError):
    """A DICOM file whose pixel data is shorter than its image: it is reported as failed
    (never skipped as not being DICOM, never written)."""


def _check_complete(ds: Dataset, length: int) -> None:
    """Raise :class:`IncompleteInstance` when native pixel data of ``length`` bytes is shorter than
    the image its attributes describe (a file cut off, which would be exported broken)."""
    try:
        expected = get_expected_length(ds)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise IncompleteInstance("the image attributes (rows, columns, bits) are missing or "
                                 "unreadable") from exc
    if not isinstance(expected, int):  # a Number of Frames that is no number ("1A")
        raise IncompleteInstance("the image attributes (rows, columns, frames, bits) are "
                                 "unreadable")
    if length < expected:
        raise IncompleteInstance(f"the pixel data holds {length} bytes where its image needs "
                                f"{expected} (the file is cut off)")


def _syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _save_header(header: Dataset, target: BinaryIO) -> None:
    """Write ``header`` as a Part 10 file (preamble, file meta, data set) in its own encoding;
    what ``save_as`` does, without copying the file meta first."""
    meta = header.file_meta
    if "FileMetaInformationVersion" not in meta:
        meta.FileMetaInformationVersion = b"\x00\x01"
    if 0x00020000 in meta:
        del meta[0x00020000]  # the group length is written below, from what was written
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, meta)
    group = body.getvalue()
    out = DicomFileLike(target)
    out.write(header.preamble or b"\0" * 128)
    out.write(b"DICM")
    out.write(b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<L", len(group)) + group)
    out.is_implicit_VR, out.is_little_endian = _encoding_of(header)
    write_dataset(out, header)


def _element_end(source: BinaryIO, at: int, size: int,
                 encoding: tuple[bool | None, bool | None]) -> int:
    """Where the (pixel data) element starting at ``at`` ends; encapsulated data is walked
    item by item. Raises InvalidDicomError for data that runs past the end of the file."""
    implicit = bool(encoding[0])
    source.seek(at)
    head = source.read(12)
    if len(head) < 8:
        raise InvalidDicomError("truncated pixel data")
    if implicit:
        (length,), header = struct.unpack("<L", head[4:8]), 8
    elif head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        (length,), header = struct.unpack("<L", head[8:12]), 12
    else:
        (length,), header = struct.unpack("<H", head[6:8]), 8
    if length != 0xFFFFFFFF:
        if at + header + length > size:
            raise InvalidDicomError("pixel data runs past the end of the file")
        return at + header + length
    position = at + header
    while True:
        source.seek(position)
        item = source.read(8)
        if len(item) < 8:
            raise InvalidDicomError("encapsulated pixel data without its end")
        group, element, item_length = struct.unpack("<HHL", item)
        if (group, element) == (0xFFFE, 0xE0DD):
            return position + 8
        if (group, element) != (0xFFFE, 0xE000) or item_length == 0xFFFFFFFF:
            raise InvalidDicomError("malformed encapsulated pixel data")
        position += 8 + item_length
        if position > size:
            raise InvalidDicomError("encapsulated pixel data runs past the end of the file")


def _copy_canonical(source: BinaryIO, target: BinaryIO, offset: int, length: int,
                    bits: StoredBits) -> bool:
    """Copy native pixel data (``length`` bytes at ``offset``) to the end of ``target`` with
    the bits outside Bits Stored made canonical; True when any changed."""
    target.seek(0, os.SEEK_END)
    changed = False
    done = 0
    while done < length:
        source.seek(offset + done)
        chunk = source.read(min(_COPY_CHUNK, length - done))
        if not chunk:
            raise InvalidDicomError("the source ended while its pixel data was copied")
        whole = len(chunk) - len(chunk) % (bits.allocated // 8)
        canonical, altered = bits.canonical(chunk[:whole])
        target.write(canonical + chunk[whole:])
        changed = changed or altered
        done += len(chunk)
    return changed


def _copy(source: BinaryIO, target: BinaryIO, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of ``source`` to the end of ``target``: in the
    kernel when both are files (no copy through Python), else in 1 MB chunks."""
    target.flush()
    try:
        src, dst = source.fileno(), target.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        src = dst = -1
    copied = 0
    if src >= 0:
        try:
            while copied < length:
                n = os.copy_file_range(src, dst, length - copied, offset + copied)
                if n == 0:
                    break
                copied += n
        except OSError:
            pass
        target.seek(0, os.SEEK_END)
    if copied < length:
        source.seek(offset + copied)
        remaining = length - copied
        while remaining:
            chunk = source.read(min(_COPY_CHUNK, remaining))
            if not chunk:
                raise InvalidDicomError("the source ended while its pixel data was copied")
            target.write(chunk)
            remaining -= len(chunk)


class ExportWriter(Protocol):
    """Where de-identified (or identifiable) instances go: a folder, a zip, DICOMDIR media."""

    def staging(self) -> Path:
        """A folder for staging files next to the output (same file system)."""
        ...

    def prepare(self, ds: Dataset) -> None:
        """Values the output needs in every header (DICOMDIR keys); nothing for most."""
        ...

    def add_staged(self, path: Path, ds: Dataset) -> str:
        """Take the verified staging file ``path`` (header ``ds``); returns its name in the
        export (never patient data)."""
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
    verify_seconds: float = 0.0
    bytes_in: int = 0
    export_findings: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """One line for people."""
        return (f"{self.written} written, {self.held_back} held back for review, "
                f"{self.failed} failed, {self.skipped} skipped (not DICOM) "
                f"with profile {self.profile} in {self.seconds:.1f} s "
                f"(verification {self.verify_seconds:.1f} s)")

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
                "verification_seconds": self.verify_seconds,
                "export_findings": self.export_findings, "files": files}

    def write(self, path: Path, with_inputs: bool) -> None:
        """Save the report as JSON."""
        path.write_text(json.dumps(self.as_dict(with_inputs), indent=2, default=str))


def deidentify_inputs(
    inputs: list[Path], deidentifier: Deidentifier, writer: ExportWriter,
    progress: Callable[[int], None] | None = None,
) -> DeidentificationReport:
    """De-identify every DICOM file the inputs hold into ``writer``; every copy is verified
    before it is added."""
    report = DeidentificationReport(deidentifier.profile.name)
    walk = ImportReport()
    walker = DicomInputs()
    started = time.monotonic()
    staging = writer.staging()
    try:
        for candidate in walker.candidates(inputs, walk):
            _one(candidate, deidentifier, writer, staging, report)
            if progress:
                progress(1)
        for label, reason in walk.refused:
            report.failed += 1
            report.files.append({"input": label, "error": reason})
        report.skipped += walk.skipped
    finally:
        walker.close()
        writer.close()
        shutil.rmtree(staging, ignore_errors=True)
        report.seconds = round(time.monotonic() - started, 3)
    return report


def _one(candidate: Any, deidentifier: Deidentifier, writer: ExportWriter, staging: Path,
         report: DeidentificationReport) -> None:
    with candidate.open() as stream, _seekable(stream) as source:
        fd, name = tempfile.mkstemp(suffix=".dcm", dir=staging)
        path = Path(name)
        try:
            with os.fdopen(fd, "w+b") as target:
                try:
                    outcome = deidentifier.write(source, target, writer.prepare)
                except IncompleteInstance as exc:
                    report.failed += 1
                    report.files.append({"input": candidate.label, "error": str(exc)})
                    return
                except (InvalidDicomError, OSError, ValueError, EOFError, KeyError,
                        struct.error) as exc:
                    if candidate.explicit:
                        report.failed += 1
                        report.files.append({"input": candidate.label, "error":
                                             f"not a readable DICOM file ({type(exc).__name__})"})
                    else:
                        report.skipped += 1
                    return
                except Exception as exc:  # noqa: BLE001 - reported per file; never written
                    report.failed += 1
                    report.files.append({"input": candidate.label, "error":
                                         f"could not be de-identified ({type(exc).__name__})"})
                    return
                report.bytes_in += source.seek(0, os.SEEK_END)
            report.verify_seconds += outcome.report.get("verification", {}).get("seconds", 0)
            entry = {"input": candidate.label, **outcome.report}
            if outcome.held_back:
                report.held_back += 1
            else:
                assert outcome.dataset is not None  # written, so its data set is known
                entry["output"] = writer.add_staged(path, outcome.dataset)
                report.written += 1
            report.files.append(entry)
        finally:
            path.unlink(missing_ok=True)
    report.verify_seconds = round(report.verify_seconds, 3)


class _seekable:
    """A seekable view of an input stream: itself, or a spooled copy (zip members, object
    store bodies)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.copy: Any = None

    def __enter__(self) -> BinaryIO:
        try:
            if self.stream.seekable() and hasattr(self.stream, "fileno"):
                self.stream.fileno()
                return self.stream
        except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
            pass
        self.copy = tempfile.SpooledTemporaryFile(max_size=32 * 1024 * 1024)
        shutil.copyfileobj(self.stream, self.copy, _COPY_CHUNK)
        self.copy.seek(0)
        return self.copy

    def __exit__(self, *exc: object) -> None:
        if self.copy is not None:
            self.copy.close()


def seekable(stream: BinaryIO) -> _seekable:
    """A context giving a seekable stream with the bytes of ``stream``."""
    return _seekable(stream)
