"""The pixel budget: what an image's pixels take once decoded, checked before anything is
decoded, and a bound on how many decodes run at once.

A 2 MB RLE file can claim 65535 × 65535 pixels; decoding it would allocate its claim. Every
path that decodes pixels (rendering and thumbnails, WADO-RS frames, transcoding, MP4 and image
exports, de-identification pixel cleaning and OCR) goes through :func:`decoding` or
:func:`decode_frame`, and ingest refuses instances over the budget with
:func:`check_pixel_budget`, so such a file is refused with a reason before any allocation.

The budget is a property of the process (its memory), like the number of decode slots: the
composition root sets it once from the settings with :func:`configure`; until then the
defaults of :class:`PixelLimits` hold.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.encaps import generate_fragments, get_frame
from pydicom.pixels import iter_pixels, pixel_array
from pydicom.uid import UID

from imageshare.domain.errors import ImageTooLarge, ServiceBusy, UndecodableImage

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class PixelLimits:
    """Most bytes one decoded frame and one decoded instance may take, and how many decodes
    may run at once in this process (0: one per core, at least two)."""

    max_frame_bytes: int = 256 * MiB
    max_instance_bytes: int = 2 * GiB
    max_concurrent_decodes: int = 0
    wait_seconds: float = 60.0

    @property
    def slots(self) -> int:
        """How many decodes may run at once."""
        return self.max_concurrent_decodes or max(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class DecodedSize:
    """The decoded shape of an image, as its header declares it."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    frames: int

    @property
    def bytes_per_sample(self) -> int:
        """Bytes per sample once decoded (1-bit data is unpacked to one byte per pixel)."""
        size = 1
        while size * 8 < self.bits_allocated:
            size *= 2
        return size

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded frame."""
        return self.rows * self.columns * self.samples * self.bytes_per_sample

    @property
    def total_bytes(self) -> int:
        """Bytes of every frame decoded."""
        return self.frame_bytes * self.frames

    def describe(self) -> str:
        """The dimensions in words (no patient data)."""
        return (f"{self.columns} × {self.rows} pixels, {self.samples} sample(s) of "
                f"{self.bits_allocated} bits, {self.frames} frame(s)")


class _Budget:
    def __init__(self, limits: PixelLimits) -> None:
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.slots)


_budget = _Budget(PixelLimits())


def configure(limits: PixelLimits) -> None:
    """Make ``limits`` the budget of this process (called once by the composition root)."""
    global _budget
    _budget = _Budget(limits)


def current_limits() -> PixelLimits:
    """The budget in force in this process."""
    return _budget.limits


def _whole(ds: Dataset, keyword: str, default: int | None) -> int | None:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - an undecodable value is bad input
        raise UndecodableImage(f"the image's {keyword} cannot be read") from exc
    if value is None or (isinstance(value, str | bytes) and not value.strip()):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise UndecodableImage(f"the image's {keyword} is not a whole number") from exc
    if number < 0:
        raise UndecodableImage(f"the image's {keyword} is negative")
    return number


def decoded_size(ds: Dataset) -> DecodedSize | None:
    """The decoded size ``ds`` declares (Rows × Columns × Samples per Pixel × Bits Allocated ×
    Number of Frames), or None when it declares no image. Raises :class:`UndecodableImage`
    when one of these values cannot be read."""
    rows, columns = _whole(ds, "Rows", None), _whole(ds, "Columns", None)
    if rows is None and columns is None:
        return None
    return DecodedSize(
        rows=rows or 0, columns=columns or 0,
        samples=_whole(ds, "SamplesPerPixel", 1) or 1,
        bits_allocated=_whole(ds, "BitsAllocated", 8) or 8,
        frames=_whole(ds, "NumberOfFrames", 1) or 1,
    )


def _amount(size: int) -> str:
    if size >= GiB:
        return f"{size / GiB:.1f} GiB"
    return f"{size / MiB:.1f} MiB"


def check_pixel_budget(ds: Dataset, limits: PixelLimits | None = None) -> DecodedSize | None:
    """Refuse (:class:`ImageTooLarge`) an image whose decoded frame or decoded instance would
    exceed the budget; returns its decoded size (None when ``ds`` has no image).

    Only the header is looked at: call it before decoding anything.
    """
    limits = limits or _budget.limits
    size = decoded_size(ds)
    if size is None:
        return None
    if size.frame_bytes > limits.max_frame_bytes:
        raise ImageTooLarge(
            f"one frame would take {_amount(size.frame_bytes)} once decoded "
            f"({size.describe()}); the limit is {_amount(limits.max_frame_bytes)} per frame "
            "(setting max_decoded_frame_bytes)")
    if size.total_bytes > limits.max_instance_bytes:
        raise ImageTooLarge(
            f"the image would take {_amount(size.total_bytes)} once decoded "
            f"({size.describe()}); the limit is {_amount(limits.max_instance_bytes)} per "
            "instance (setting max_decoded_instance_bytes)")
    return size


# Codestream headers a decoder sizes its buffers from (its own, not the DICOM header's): JPEG
# (ISO 10918) and JPEG-LS (ISO 14495) start with SOI and carry the size in their SOF segment;
# JPEG 2000 and HTJ2K (ISO 15444) start with SOC and carry it in the SIZ segment.
_SOI, _SOC_SIZ = b"\xff\xd8", b"\xff\x4f\xff\x51"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF, 0xF7})  # 0xF7: JPEG-LS SOF55
_HEADER_PREFIX = 1 << 12  # bytes read first to find a codestream's size
_HEADER_LIMIT = 1 << 20  # most bytes read to find it (APPn segments come before SOF)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


class _ShortHeader(Exception):
    """The codestream header runs past the bytes at hand."""


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG or JPEG-LS codestream's frame header."""
    at = 2
    while True:
        if at + 4 > len(data):
            raise _ShortHeader
        if data[at] != 0xFF:
            raise UndecodableImage("a compressed frame's JPEG header is damaged")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            raise UndecodableImage("a compressed frame's JPEG header declares no frame size")
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker in _JPEG_SOF:
            if at + 10 > len(data):
                raise _ShortHeader
            rows = int.from_bytes(data[at + 5:at + 7], "big")
            columns = int.from_bytes(data[at + 7:at + 9], "big")
            return rows, columns, data[at + 9]
        if length < 2:
            raise UndecodableImage("a compressed frame's JPEG header is damaged")
        at += 2 + length


def _j2k_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) of a JPEG 2000 codestream's SIZ segment (ISO 15444-1
    A.5.1); ``data`` starts with SOC."""
    if len(data) < 42:
        raise _ShortHeader
    xsiz, ysiz, xosiz, yosiz = (int.from_bytes(data[at:at + 4], "big")
                                for at in (8, 12, 16, 20))
    if xosiz > xsiz or yosiz > ysiz:
        raise UndecodableImage("a compressed frame's JPEG 2000 header is damaged")
    return ysiz - yosiz, xsiz - xosiz, int.from_bytes(data[40:42], "big")


def _codestream_size(data: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a frame's codestream declares, from the start of the
    frame's first fragment; None when it starts with no codestream ImageShare sizes (RLE, a
    continuation fragment), _ShortHeader when more bytes are needed."""
    if data.startswith(_SOI):
        return _jpeg_size(data)
    if data.startswith(_JP2_SIGNATURE):  # a JP2 file instead of a bare codestream
        at = data.find(_SOC_SIZ)
        if at < 0:
            raise _ShortHeader
        data = data[at:]
    if data.startswith(_SOC_SIZ):
        return _j2k_size(data)
    return None


def check_codestream(header: Dataset, start: bytes | Callable[[int], bytes]) -> None:
    """Refuse (:class:`ImageTooLarge`) a compressed frame whose codestream declares more rows,
    columns or components than the DICOM header: a decoder allocates what the codestream
    declares, so a small frame could claim gigabytes the budget never saw (a decompression
    bomb that lies in its header). ``start``: the fragment's bytes, or a function giving up
    to that many of its first bytes. :class:`UndecodableImage` when the codestream's header
    cannot be read."""
    size = decoded_size(header)
    if size is None:
        return
    read = start if callable(start) else (lambda n: start[:n])
    data = read(_HEADER_PREFIX)
    try:
        declared = _codestream_size(data)
    except _ShortHeader:
        data = read(_HEADER_LIMIT)
        try:
            declared = _codestream_size(data)
        except _ShortHeader:
            raise UndecodableImage("a compressed frame's header cannot be read") from None
    if declared is None:
        return
    rows, columns, components = declared
    if rows > size.rows or columns > size.columns or components > size.samples:
        raise ImageTooLarge(
            f"a compressed frame declares {columns} × {rows} pixels of {components} "
            f"component(s), more than the image's {size.columns} × {size.rows} of "
            f"{size.samples}: refused before decoding")


def _encapsulated(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return bool(syntax) and UID(syntax).is_compressed


def check_dataset_codestreams(ds: Dataset) -> None:
    """:func:`check_codestream` for every fragment of a compressed data set's Pixel Data
    (every frame starts a fragment); nothing for native pixel data."""
    if "PixelData" not in ds or not _encapsulated(ds):
        return
    value = ds.PixelData
    if not isinstance(value, bytes | bytearray):
        return
    try:
        fragments = list(generate_fragments(value))
    except (ValueError, EOFError) as exc:
        raise UndecodableImage("the image's compressed pixel data is damaged") from exc
    for fragment in fragments:
        check_codestream(ds, fragment)


def check_stream_codestreams(stream: BinaryIO, header: Dataset,
                             index: int | None = None) -> None:
    """:func:`check_codestream` for frame ``index`` (0-based) of the compressed Pixel Data of
    the Part 10 instance in ``stream`` (seekable), or for every fragment when ``index`` is
    None or the frame cannot be told apart (only each fragment's first bytes are read then);
    nothing for native pixel data."""
    if not _encapsulated(header):
        return
    start = _fragments_start(stream)
    if start is None:
        return  # no encapsulated Pixel Data here: the decoder refuses it
    if index is not None:
        stream.seek(start)
        frames = decoded_size(header)
        try:
            frame = get_frame(stream, index, number_of_frames=frames.frames if frames else 1,
                              extended_offsets=_extended_offsets(header))
        except Exception:  # noqa: BLE001 - an odd layout: every fragment is checked below
            frame = None
        if frame is not None:
            check_codestream(header, frame)
            return
    stream.seek(start)
    first = True
    while True:
        item = stream.read(8)
        if len(item) != 8 or item[:4] != b"\xfe\xff\x00\xe0":
            return  # the sequence delimiter (or damage, which the decoder reports)
        length = int.from_bytes(item[4:], "little")
        position = stream.tell()
        if not first and length:  # the first item is the Basic Offset Table

            def read(n: int, at: int = position, most: int = length) -> bytes:
                stream.seek(at)
                return stream.read(min(n, most))

            check_codestream(header, read)
        first = False
        stream.seek(position + length)


def _fragments_start(stream: BinaryIO) -> int | None:
    """Where the items of the encapsulated Pixel Data of the Part 10 instance in ``stream``
    begin (its Basic Offset Table item), or None when it has none."""
    stream.seek(0)
    dcmread(stream, stop_before_pixels=True)
    head = stream.read(12)  # (7FE0,0010) OB, two reserved bytes, undefined length
    if len(head) != 12 or head[:4] != b"\xe0\x7f\x10\x00" or head[8:] != b"\xff" * 4:
        return None
    return stream.tell()


def _extended_offsets(header: Dataset) -> tuple[bytes, bytes] | None:
    offsets, lengths = header.get("ExtendedOffsetTable"), header.get("ExtendedOffsetTableLengths")
    if isinstance(offsets, bytes) and isinstance(lengths, bytes):
        return offsets, lengths
    return None


@contextmanager
def decoding(ds: Dataset) -> Iterator[DecodedSize | None]:
    """Check the budget of ``ds`` (and the sizes its compressed frames declare, when ``ds``
    holds its Pixel Data) and hold one of the process's decode slots: decode (and
    work on the decoded pixels) inside the ``with`` block. Raises :class:`ImageTooLarge`, or
    :class:`ServiceBusy` when no slot frees up in time."""
    size = check_pixel_budget(ds)
    check_dataset_codestreams(ds)
    budget = _budget
    if not budget.slots.acquire(timeout=budget.limits.wait_seconds):
        raise ServiceBusy("too many images are being decoded at once; try again shortly")
    try:
        yield size
    finally:
        budget.slots.release()


_DEFLATED = "1.2.840.10008.1.2.1.99"


def read_frame(stream: BinaryIO, header: Dataset, index: int, *, raw: bool = False) -> Any:
    """Frame ``index`` (0-based) of the Part 10 instance in ``stream`` whose header is
    ``header``, decoded (only that frame, except for a deflated data set, which is inflated
    whole: ingest bounds its inflated size). Call it inside :func:`decoding`."""
    stream.seek(0)
    meta = getattr(header, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return pixel_array(dcmread(stream), index=index, raw=raw)
    return pixel_array(stream, index=index, raw=raw)


def decode_frame(stream: BinaryIO, index: int, *, raw: bool = False,
                 header: Dataset | None = None) -> Any:
    """Frame ``index`` (0-based) of the Part 10 instance in ``stream`` as an array, decoded
    within the budget (only that frame is decoded). ``header``: the instance's header if
    already read. Decoder errors (no codec, damaged data) propagate as the plugins raise them.
    """
    if header is None:
        stream.seek(0)
        header = dcmread(stream, stop_before_pixels=True)
    check_pixel_budget(header)
    check_stream_codestreams(stream, header, index)
    with decoding(header):
        try:
            return read_frame(stream, header, index, raw=raw)
        except MemoryError as exc:
            raise ImageTooLarge("the frame does not fit in memory now") from exc


def decoded_frames(ds: Dataset) -> Iterator[Any]:
    """The frames of ``ds`` one at a time, decoded within the budget (one frame in memory)."""
    with decoding(ds):
        yield from iter_pixels(ds)
