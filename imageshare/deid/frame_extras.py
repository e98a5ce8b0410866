"""What a compressed frame carries besides its image, and the frame without it.

A JPEG (baseline, extended, lossless, JPEG-LS) frame may hold comments (COM), application
segments (APP1 Exif/XMP, APP3-APP15, a JFIF thumbnail) and bytes after its end-of-image
marker; a JPEG 2000 codestream may hold comments in its main and tile-part headers and bytes
after its end. None of it is needed to decode the image and any of it may name the patient,
anywhere in the frame and in any encoding. :func:`strip_extras` returns the frame with all of
it removed, keeping only the segments a decoder needs for colour (a thumbnail-free JFIF APP0,
APP2 ICC profile, APP14 Adobe), whose bytes are returned for the identity check.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_J2K_SOC = b"\xff\x4f\xff\x51"
_J2K_COM, _J2K_SOT, _J2K_SOD, _J2K_EOC, _J2K_TLM = 0x64, 0x90, 0x93, 0xD9, 0x55
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length
# One frame is read whole to be walked: larger ones are not read (held back, for review).
MAX_FRAME_BYTES = 512 * 1024 * 1024


class FrameUnreadable(ValueError):
    """The frame's marker structure cannot be followed, so nothing can be said about it."""


@dataclass
class Stripped:
    """A frame without its extras, what was removed and the kept segments to check."""

    frame: bytes
    removed: int = 0  # segments and trailing runs taken out
    kept: list[bytes] = field(default_factory=list)  # colour segments kept (checked by caller)

    @property
    def changed(self) -> bool:
        """True when anything was taken out."""
        return self.removed > 0


def strip_extras(frame: bytes) -> Stripped:
    """``frame`` (one compressed frame, all its fragments joined) without comments,
    application segments and trailing bytes. Frames of other codecs (RLE) come back as
    they are. Raises :class:`FrameUnreadable` for a JPEG or JPEG 2000 frame whose markers
    cannot be followed to its end."""
    if frame[:2] == b"\xff\xd8":
        return _strip_jpeg(frame)
    if frame[:4] == _J2K_SOC:
        return _strip_j2k(frame)
    if frame[4:12] == b"jP  \r\n\x87\n":
        raise FrameUnreadable("a JPEG 2000 frame wrapped in a JP2 file (PS3.5 A.4.4 forbids "
                              "it; its boxes are not read)")
    return Stripped(frame)


def is_frame_start(fragment: bytes) -> bool:
    """True when ``fragment`` begins a JPEG or JPEG 2000 frame (not a continuation)."""
    return fragment[:2] == b"\xff\xd8" or fragment[:4] == _J2K_SOC


def _kept_jpeg_segment(marker: int, body: bytes) -> bool:
    """Segments a decoder uses for colour: JFIF without a thumbnail, ICC profile, Adobe."""
    if marker == 0xE0:
        return body[:5] == b"JFIF\0" and len(body) == 14 and body[12:14] == b"\0\0"
    if marker == 0xE2:
        return body[:12] == b"ICC_PROFILE\0"
    if marker == 0xEE:
        return body[:5] == b"Adobe" and len(body) == 12
    return False


def _strip_jpeg(frame: bytes) -> Stripped:
    out = bytearray(b"\xff\xd8")
    result = Stripped(b"")
    position, size = 2, len(frame)
    while True:
        while position < size and frame[position] == 0xFF and position + 1 < size \
                and frame[position + 1] == 0xFF:
            position += 1  # fill bytes
        if position + 2 > size or frame[position] != 0xFF:
            raise FrameUnreadable("a JPEG frame without its end-of-image marker")
        marker = frame[position + 1]
        if marker == _EOI:
            out += b"\xff\xd9"
            tail = frame[position + 2:]
            if tail.strip(b"\0"):
                result.removed += 1  # anything but padding after the image
            break
        if marker in _STANDALONE:
            out += frame[position:position + 2]
            position += 2
            continue
        if position + 4 > size:
            raise FrameUnreadable("a JPEG segment cut off")
        (length,) = struct.unpack(">H", frame[position + 2:position + 4])
        end = position + 2 + length
        if length < 2 or end > size:
            raise FrameUnreadable("a JPEG segment longer than its frame")
        body = frame[position + 4:end]
        if marker == 0xFE or 0xE0 <= marker <= 0xEF:
            if _kept_jpeg_segment(marker, body):
                out += frame[position:end]
                result.kept.append(body)
            else:
                result.removed += 1
            position = end
            continue
        out += frame[position:end]
        position = end
        if marker == _SOS:
            scan_end = _scan_end(frame, position)
            out += frame[position:scan_end]
            position = scan_end
    result.frame = bytes(out)
    return result


def _scan_end(frame: bytes, position: int) -> int:
    """Where the entropy-coded data starting at ``position`` ends: at the next marker that
    is not a restart (a stuffed 0xFF00, or JPEG-LS's 0xFF followed by a byte below 0x80,
    is data)."""
    size = len(frame)
    while True:
        found = frame.find(b"\xff", position)
        if found < 0 or found + 1 >= size:
            raise FrameUnreadable("a JPEG scan without its end")
        following = frame[found + 1]
        if following < 0xC0 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            position = found + 1
            continue
        return found


def _strip_j2k(frame: bytes) -> Stripped:
    out = bytearray(frame[:2])
    result = Stripped(b"")
    position, size, listed = 2, len(frame), False
    while position + 2 <= size:
        if frame[position] != 0xFF:
            raise FrameUnreadable("a JPEG 2000 header marker expected")
        marker = frame[position + 1]
        if marker == _J2K_EOC:
            out += b"\xff\xd9"
            if frame[position + 2:].strip(b"\0"):
                result.removed += 1
            result.frame = bytes(out)
            return result
        if marker == _J2K_SOT:
            position = _j2k_tile_part(frame, position, out, result, listed)
            continue
        length = _j2k_length(frame, position)
        if marker == _J2K_COM:
            result.removed += 1
        else:
            listed = listed or marker == _J2K_TLM  # tile-part lengths listed in the header
            out += frame[position:position + 2 + length]
        position += 2 + length
    raise FrameUnreadable("a JPEG 2000 codestream without its end marker")


def _j2k_length(frame: bytes, position: int) -> int:
    if position + 4 > len(frame):
        raise FrameUnreadable("a JPEG 2000 marker segment cut off")
    (length,) = struct.unpack(">H", frame[position + 2:position + 4])
    if length < 2 or position + 2 + length > len(frame):
        raise FrameUnreadable("a JPEG 2000 marker segment longer than its codestream")
    return length


def _j2k_tile_part(frame: bytes, start: int, out: bytearray, result: Stripped,
                   listed: bool) -> int:
    """Copy one tile-part (SOT ... SOD data) to ``out`` without the comments in its header,
    its length rewritten; returns where the next marker is. ``listed``: the main header
    lists tile-part lengths (TLM), which a removed comment would make wrong."""
    if _j2k_length(frame, start) != 10:
        raise FrameUnreadable("a JPEG 2000 tile-part header of the wrong length")
    (psot,) = struct.unpack(">L", frame[start + 6:start + 10])
    end = frame.rfind(b"\xff\xd9") if psot == 0 else start + psot
    if end > len(frame) or end < start + 14:
        raise FrameUnreadable("a JPEG 2000 tile-part longer than its codestream")
    header = bytearray(frame[start:start + 12])
    position = start + 12
    while True:
        if position + 2 > end or frame[position] != 0xFF:
            raise FrameUnreadable("a JPEG 2000 tile-part header marker expected")
        marker = frame[position + 1]
        if marker == _J2K_SOD:
            break
        length = _j2k_length(frame, position)
        if marker == _J2K_COM:
            result.removed += 1
        else:
            header += frame[position:position + 2 + length]
        position += 2 + length
        if position >= end:
            raise FrameUnreadable("a JPEG 2000 tile-part without its data")
    data = frame[position:end]
    if len(header) + len(data) != end - start:
        if listed:
            raise FrameUnreadable("a JPEG 2000 comment inside a tile-part whose length the "
                                  "main header lists")
        if psot:
            struct.pack_into(">L", header, 6, len(header) + len(data))
    out += header + data
    return end


def encapsulated_items(source: BinaryIO, end: int) -> Iterator[bytes]:
    """The items (basic offset table first, then fragments) of encapsulated pixel data whose
    first item starts at ``source``'s position, up to the sequence delimiter or ``end``."""
    position = source.tell()
    while position + 8 <= end:
        source.seek(position)
        group, element, length = struct.unpack("<HHL", source.read(8))
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or position + 8 + length > end:
            raise FrameUnreadable("malformed encapsulated pixel data")
        if length > MAX_FRAME_BYTES:
            raise FrameUnreadable("a fragment too large to be read for the text it may carry")
        yield source.read(length)
        position += 8 + length


def frames_of(fragments: Iterable[bytes]) -> Iterator[bytes]:
    """Whole frames from fragments: a fragment that does not begin a JPEG or JPEG 2000 frame
    continues the one before. Fragments of other codecs come one per frame."""
    frame: list[bytes] = []
    size = 0
    for fragment in fragments:
        if frame and is_frame_start(fragment):
            yield b"".join(frame)
            frame, size = [], 0
        frame.append(fragment)
        size += len(fragment)
        if size > MAX_FRAME_BYTES:
            raise FrameUnreadable("a frame too large to be read for the text it may carry")
    if frame:
        yield b"".join(frame)
