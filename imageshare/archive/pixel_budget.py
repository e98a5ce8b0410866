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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import Dataset, dcmread
from pydicom.pixels import iter_pixels, pixel_array

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


@contextmanager
def decoding(ds: Dataset) -> Iterator[DecodedSize | None]:
    """Check the budget of ``ds`` and hold one of the process's decode slots: decode (and
    work on the decoded pixels) inside the ``with`` block. Raises :class:`ImageTooLarge`, or
    :class:`ServiceBusy` when no slot frees up in time."""
    size = check_pixel_budget(ds)
    budget = _budget
    if not budget.slots.acquire(timeout=budget.limits.wait_seconds):
        raise ServiceBusy("too many images are being decoded at once; try again shortly")
    try:
        yield size
    finally:
        budget.slots.release()


def decode_frame(stream: BinaryIO, index: int, *, raw: bool = False,
                 header: Dataset | None = None) -> Any:
    """Frame ``index`` (0-based) of the Part 10 instance in ``stream`` as an array, decoded
    within the budget (only that frame is decoded). ``header``: the instance's header if
    already read. Decoder errors (no codec, damaged data) propagate as the plugins raise them.
    """
    if header is None:
        stream.seek(0)
        header = dcmread(stream, stop_before_pixels=True)
    stream.seek(0)
    with decoding(header):
        try:
            return pixel_array(stream, index=index, raw=raw)
        except MemoryError as exc:
            raise ImageTooLarge("the frame does not fit in memory now") from exc


def decoded_frames(ds: Dataset) -> Iterator[Any]:
    """The frames of ``ds`` one at a time, decoded within the budget (one frame in memory)."""
    with decoding(ds):
        yield from iter_pixels(ds)
