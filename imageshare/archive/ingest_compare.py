"""Whether an instance that arrives again under a stored SOP Instance UID is the instance
already stored.

Two files hold the same instance when their data sets are equal: the File Meta Information
(group 0002: Source AE Title, Implementation Class UID, ...) is not part of the data set
(PS3.10 7.1), so the same instance re-sent by another node, another program or another
service (C-STORE, then STOW-RS) is a duplicate, not new content. In another transfer syntax,
the instance is the same when its attributes other than the pixel data are equal and its
pixels decode equal; when the pixels cannot be decoded cheaply here (more than
:data:`DECODE_COMPARE_BYTES` once decoded, no codec, no decode slot free), equal attributes
under the same SOP Instance UID are taken for the same instance (the stored copy is kept).
"""

from __future__ import annotations

import logging
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info

from imageshare.archive.pixel_budget import check_pixel_budget, decoding
from imageshare.storage.blobs import CHUNK, BlobStore, read_up_to

log = logging.getLogger("imageshare.ingest")
# The pixels of instances stored in two transfer syntaxes are decoded and compared only when
# each decodes to at most this many bytes (the comparison runs while the index waits).
DECODE_COMPARE_BYTES = 32 << 20
_PREAMBLE = 132  # 128-byte preamble and "DICM"
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
# Data Set Trailing Padding (FFFC,FFFC): "no meaning" (PS3.10 7.2), and programs drop or add
# it when they send a file on (DCMTK's storescu drops it).
_PADDING = 0xFFFCFFFC
_PADDING_LE = b"\xfc\xff\xfc\xff"
_IMPLICIT = "1.2.840.10008.1.2"


def same_instance(blobs: BlobStore, stored_key: str, new_key: str) -> bool:
    """Whether the blobs ``stored_key`` and ``new_key`` hold the same instance: equal data
    sets, whatever their File Meta Information says (see the module's description)."""
    try:
        with blobs.open(stored_key) as old, blobs.open(new_key) as new:
            old_syntax, old_start = _data_set_start(old)
            new_syntax, new_start = _data_set_start(new)
            if old_syntax == new_syntax and _same_bytes(old, old_start, new, new_start):
                return True
            return _same_parsed(old, new, old_syntax == new_syntax, old_syntax == _IMPLICIT)
    except Exception as exc:  # noqa: BLE001 - unreadable: not shown to be the same instance
        log.info("instance comparison failed (%s): taken as different content",
                 type(exc).__name__)
        return False


def _data_set_start(fp: BinaryIO) -> tuple[str, int]:
    """The transfer syntax of the Part 10 file open as ``fp`` and where its data set starts."""
    fp.seek(_PREAMBLE)
    meta = _read_file_meta_info(fp)
    return str(meta.get("TransferSyntaxUID", "")), fp.tell()


def _same_bytes(a: BinaryIO, a_start: int, b: BinaryIO, b_start: int,
                a_end: int | None = None, b_end: int | None = None) -> bool:
    """Whether ``a`` from ``a_start`` and ``b`` from ``b_start`` hold the same bytes to
    ``a_end`` and ``b_end`` (None: their ends), read a chunk at a time."""
    a.seek(a_start)
    b.seek(b_start)
    a_left = None if a_end is None else a_end - a_start
    b_left = None if b_end is None else b_end - b_start
    if a_left is not None and b_left is not None and a_left != b_left:
        return False
    while True:
        left = read_up_to(a, CHUNK if a_left is None else min(CHUNK, a_left))
        right = read_up_to(b, CHUNK if b_left is None else min(CHUNK, b_left))
        if left != right:
            return False
        if not left:
            return True
        a_left = None if a_left is None else a_left - len(left)
        b_left = None if b_left is None else b_left - len(right)


def _padding_start(fp: BinaryIO, start: int, implicit: bool) -> int | None:
    """Where a Data Set Trailing Padding element that ends the file open as ``fp`` (little
    endian, read from ``start``) begins; None when the file does not end with one."""
    size = fp.seek(0, 2)
    header = 8 if implicit else 12
    found = None
    position = start
    carry = b""
    while position < size:
        fp.seek(position)
        chunk = carry + read_up_to(fp, CHUNK)
        base = position - len(carry)
        at = chunk.find(_PADDING_LE)
        while at >= 0:
            head = chunk[at:at + header]
            if len(head) < header:
                fp.seek(base + at)
                head = read_up_to(fp, header)
            if len(head) == header and (implicit or head[6:8] == b"\0\0"):
                length = int.from_bytes(head[header - 4:], "little")
                if found is None and base + at + header + length == size:
                    found = base + at  # the first that runs to the end: all of it padding
            at = chunk.find(_PADDING_LE, at + 1)
        position = base + len(chunk)
        carry = chunk[-3:]
    return found


def _same_parsed(old: BinaryIO, new: BinaryIO, same_syntax: bool,
                 implicit: bool = False) -> bool:
    """Whether the two files' data sets are equal attribute by attribute (group 0002 and
    trailing padding left out), and their pixel data too: byte for byte in the same transfer
    syntax (``implicit``: Implicit VR Little Endian), decoded otherwise (see the module's
    description)."""
    old.seek(0)
    old_ds = dcmread(old, stop_before_pixels=True)
    old_pixels = old.tell()
    new.seek(0)
    new_ds = dcmread(new, stop_before_pixels=True)
    new_pixels = new.tell()
    if not _same_elements(old_ds, new_ds, top=True):
        return False
    if same_syntax:
        return _same_bytes(old, old_pixels, new, new_pixels,
                           _padding_start(old, old_pixels, implicit),
                           _padding_start(new, new_pixels, implicit))
    return _same_pixels(old, old_ds, new, new_ds)


def _same_elements(a: Dataset, b: Dataset, top: bool = False) -> bool:
    """Whether ``a`` and ``b`` hold equal elements, items of sequences compared in turn; at
    the ``top`` level the file meta group and the pixel data are left out."""

    def tags(ds: Dataset) -> list[int]:
        return [int(t) for t in ds.keys() if int(t) != _PADDING
                and not (top and (t >> 16 == 0x0002 or int(t) in _PIXEL_TAGS))]

    if tags(a) != tags(b):
        return False
    for tag in tags(a):
        left, right = a[tag], b[tag]
        if left.VR == "SQ" or right.VR == "SQ":
            if left.VR != right.VR or len(left.value) != len(right.value):
                return False
            if not all(_same_elements(x, y) for x, y in zip(left.value, right.value,
                                                            strict=True)):
                return False
        elif not _same_value(left.value, right.value):
            return False
    return True


def _same_value(a: Any, b: Any) -> bool:
    """Whether two element values are equal (arrays compared element-wise)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    return bool(a == b)


def _same_pixels(old: BinaryIO, old_header: Dataset, new: BinaryIO, new_header: Dataset
                 ) -> bool:
    """Whether the pixels of two instances in different transfer syntaxes (whose headers
    are given) decode equal; True when either cannot be decoded cheaply here (see the
    module's description)."""
    try:
        for header in (old_header, new_header):
            size = check_pixel_budget(header)
            if size is None or size.total_bytes > DECODE_COMPARE_BYTES:
                return True  # no image, or too big to decode while the index waits
        old.seek(0)
        old_ds = dcmread(old)
        new.seek(0)
        new_ds = dcmread(new)
        if ("PixelData" in old_ds) != ("PixelData" in new_ds):
            return False
        if "PixelData" not in old_ds:
            return True
        with decoding(old_ds):
            before = old_ds.pixel_array
        with decoding(new_ds):
            after = new_ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - no codec, damaged, busy: not decoded here
        log.info("pixels of an instance re-sent in another transfer syntax not compared "
                 "(%s); equal attributes taken for the same instance", type(exc).__name__)
        return True
    return bool(np.array_equal(before, after))
