"""The structure of a received Part 10 file, checked before anything decodes it.

Every element header of the whole data set (nested sequences, items, fragments and what
follows the pixel data included) is walked without decoding values: each length must fit
inside its parent, explicit VRs must be real VRs, sequences may not nest deeper than
:data:`MAX_SEQUENCE_DEPTH`, and encapsulated pixel data must be a Basic Offset Table followed
by fragments. The walk is iterative (no recursion), so no file can exhaust the stack, and it
never holds more than the file's mapping in memory.

Values are not judged here: a value that does not fit its VR is a matter for whoever reads it.
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

from pydicom.datadict import dictionary_VR

from imageshare.domain.errors import InvalidInstance

# Real files nest a handful of levels (structured reports a few more); 500 levels is an attack.
MAX_SEQUENCE_DEPTH = 32
# A deflated data set is inflated in memory to be walked; beyond this it is refused.
MAX_INFLATED_BYTES = 64 << 20

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass
class PixelData:
    """The top-level pixel data element: where its value starts and how it is encoded.

    ``length`` is None when encapsulated; then ``offset_table`` holds the Basic Offset Table's
    entries and ``fragments`` counts the fragments after it.
    """

    tag: int
    value_offset: int
    length: int | None
    offset_table: list[int] = field(default_factory=list)
    fragments: int = 0


@dataclass
class Structure:
    """What the walk found."""

    transfer_syntax: str
    meta_end: int
    pixel_data: PixelData | None
    deepest: int
    # How many items each top-level sequence holds (by tag), counted without parsing them.
    top_items: dict[int, int] = field(default_factory=dict)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One pass over the element headers of a data set held in ``buf``."""

    def __init__(self, buf: bytes | mmap.mmap, little: bool, explicit: bool) -> None:
        self.buf = buf
        self.endian = "<" if little else ">"
        self.explicit = explicit
        self._explicit_head = struct.Struct(self.endian + "HH2sH").unpack_from
        self._implicit_head = struct.Struct(self.endian + "HHI").unpack_from
        self.pixel_data: PixelData | None = None
        self.deepest = 0
        self.top_items: dict[int, int] = {}

    def _u16(self, pos: int) -> int:
        return struct.unpack_from(self.endian + "H", self.buf, pos)[0]

    def _u32(self, pos: int) -> int:
        return struct.unpack_from(self.endian + "I", self.buf, pos)[0]

    def _tag(self, pos: int) -> int:
        group, element = struct.unpack_from(self.endian + "HH", self.buf, pos)
        return group << 16 | element

    def _explicit_here(self, pos: int, end: int, assumed: bool) -> bool:
        """Whether the data set starting at ``pos`` uses explicit VRs (as pydicom decides:
        by the first element; items of an explicit data set may be implicit)."""
        if pos + 6 > end or self._tag(pos) >> 16 == 0xFFFE:
            return assumed
        a, b = self.buf[pos + 4], self.buf[pos + 5]
        return 0x40 < a < 0x5B and 0x40 < b < 0x5B

    def walk(self, start: int, end: int) -> int:
        """Walk the data set in ``[start, end)``; returns where it ends."""
        # Each frame: [kind, end, explicit, depth, undefined length, tag]; kind "dataset" is
        # the top level or an item, "sequence" (tag: its own) holds items until its end or
        # its delimiter.
        stack: list[list] = [
            ["dataset", end, self._explicit_here(start, end, self.explicit), 0, False, 0]]
        pos = start
        while stack:
            kind, limit, explicit, depth, undefined, top = stack[-1]
            if kind == "sequence":
                if not undefined and pos >= limit:
                    if pos > limit:
                        raise InvalidInstance("a sequence is longer than its stated length")
                    stack.pop()
                    continue
                if pos + 8 > limit:
                    raise InvalidInstance("the data set ends inside a sequence")
                tag = self._tag(pos)
                length = self._u32(pos + 4)
                pos += 8
                if tag == _SEQUENCE_END and undefined:
                    stack.pop()
                    continue
                if tag != _ITEM:
                    raise InvalidInstance(
                        f"a sequence holds something other than items at byte {pos - 8}")
                if depth == 1:
                    self.top_items[top] = self.top_items.get(top, 0) + 1
                if length == _UNDEFINED:
                    item_end, item_undefined = limit, True
                else:
                    item_end, item_undefined = pos + length, False
                    if item_end > limit:
                        raise InvalidInstance("a sequence item runs past its sequence")
                stack.append(["dataset", item_end,
                              self._explicit_here(pos, item_end, explicit), depth,
                              item_undefined, 0])
                continue
            # a data set: the top level (depth 0) or an item
            if pos >= limit or (depth == 0 and limit - pos < 8
                                and not any(self.buf[pos:limit])):
                if undefined:
                    raise InvalidInstance("a sequence item has no item delimiter")
                stack.pop()
                pos = limit if depth == 0 else pos
                continue
            if pos + 8 > limit:
                raise InvalidInstance(f"the data set ends inside an element header at byte {pos}")
            if explicit:
                group, element, vr, length = self._explicit_head(self.buf, pos)
            else:
                group, element, length = self._implicit_head(self.buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag != _ITEM_END or not undefined:
                    raise InvalidInstance(f"a delimiter {_tag_text(tag)} appears out of place")
                pos += 8
                stack.pop()
                continue
            if not explicit:
                pos += 8
                vr = _implicit_vr(tag)
            elif vr in _LONG_VRS:
                if pos + 12 > limit:
                    raise InvalidInstance("the data set ends inside an element header")
                length = self._u32(pos + 8)
                pos += 12
            elif vr in _VRS:
                pos += 8
            else:
                raise InvalidInstance(
                    f"element {_tag_text(tag)} has an invalid value representation")
            if tag in PIXEL_TAGS and length == _UNDEFINED:
                pos = self._fragments(tag, pos, limit, depth == 0)
                continue
            if vr == b"SQ" or length == _UNDEFINED:
                if vr not in (b"SQ", b"UN", None) and explicit:
                    raise InvalidInstance(
                        f"element {_tag_text(tag)} has an undefined length but is no sequence")
                if depth + 1 > MAX_SEQUENCE_DEPTH:
                    raise InvalidInstance(
                        f"sequences are nested more than {MAX_SEQUENCE_DEPTH} levels deep")
                self.deepest = max(self.deepest, depth + 1)
                if length == _UNDEFINED:
                    seq_end, seq_undefined = limit, True
                else:
                    seq_end, seq_undefined = pos + length, False
                    if seq_end > limit:
                        raise InvalidInstance(
                            f"element {_tag_text(tag)} runs past the end of its data set")
                # An undefined-length UN is a sequence encoded implicit VR little endian.
                items_explicit = explicit and vr != b"UN"
                stack.append(["sequence", seq_end, items_explicit, depth + 1, seq_undefined,
                              tag])
                continue
            if pos + length > limit:
                raise InvalidInstance(
                    f"truncated or damaged: {_tag_text(tag)} needs {length} bytes, "
                    f"{max(limit - pos, 0)} left")
            if tag in PIXEL_TAGS and depth == 0:
                self.pixel_data = PixelData(tag, pos, length)
            pos += length
        return pos

    def _fragments(self, tag: int, pos: int, limit: int, top: bool) -> int:
        """Walk encapsulated pixel data: offset table item, fragments, sequence delimiter."""
        first = True
        table: list[int] = []
        value_offset = pos
        fragments = 0
        while True:
            if pos + 8 > limit:
                raise InvalidInstance("the file is truncated inside the encapsulated pixel data")
            item_tag = struct.unpack_from("<HH", self.buf, pos)
            item = item_tag[0] << 16 | item_tag[1]
            length = struct.unpack_from("<I", self.buf, pos + 4)[0]
            pos += 8
            if item == _SEQUENCE_END:
                break
            if item != _ITEM or length == _UNDEFINED:
                raise InvalidInstance("the encapsulated pixel data is malformed")
            if pos + length > limit:
                raise InvalidInstance("the file is truncated inside the encapsulated pixel data")
            if first:
                if length % 4:
                    raise InvalidInstance("the basic offset table's length is not a multiple of 4")
                table = list(struct.unpack_from(f"<{length // 4}I", self.buf, pos))
                first = False
            else:
                fragments += 1
            pos += length
        if first:
            raise InvalidInstance("the encapsulated pixel data has no basic offset table item")
        if top:
            self.pixel_data = PixelData(tag, value_offset, None, table, fragments)
        return pos


def _implicit_vr(tag: int) -> bytes | None:
    """The dictionary VR of a tag, for implicit VR data sets (None when unknown)."""
    if tag & 0xFFFF == 0 or (tag >> 16) & 1:
        return None  # group lengths and private tags: opaque
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr.encode() if vr == "SQ" else b".."


def _meta(buf: bytes | mmap.mmap, size: int) -> tuple[str, int]:
    """The Transfer Syntax UID of the file meta information and where the data set starts."""
    if size < 132 or bytes(buf[128:132]) != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)")
    pos = 132
    syntax = ""
    while pos + 8 <= size:
        group, element = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4:pos + 6])
        if vr not in _VRS:
            raise InvalidInstance("the file meta information is damaged")
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise InvalidInstance("the file meta information is truncated")
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            pos += 12
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            pos += 8
        if length == _UNDEFINED or pos + length > size:
            raise InvalidInstance("the file meta information is truncated")
        if element == 0x0010:
            syntax = bytes(buf[pos:pos + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    if not syntax:
        raise InvalidInstance("the file meta information has no Transfer Syntax UID")
    return syntax, pos


def check_structure(fp: BinaryIO, size: int) -> Structure:
    """Walk the whole Part 10 file open as ``fp`` (``size`` bytes); raise
    :class:`InvalidInstance` with the reason when its structure is damaged."""
    with mmap.mmap(fp.fileno(), size, access=mmap.ACCESS_READ) as buf:
        syntax, start = _meta(buf, size)
        if syntax == DEFLATED:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            try:
                data = inflater.decompress(buf[start:], MAX_INFLATED_BYTES)
            except zlib.error as exc:
                raise InvalidInstance("the deflated data set cannot be inflated") from exc
            if inflater.unconsumed_tail:
                raise InvalidInstance("the deflated data set is too large")
            walker = _Walker(data, little=True, explicit=True)
            walker.walk(0, len(data))
            # Offsets in an inflated data set do not point into the file.
            return Structure(syntax, start, None, walker.deepest, walker.top_items)
        walker = _Walker(buf, little=syntax != EXPLICIT_BIG, explicit=syntax != IMPLICIT_LITTLE)
        walker.walk(start, size)
        return Structure(syntax, start, walker.pixel_data, walker.deepest, walker.top_items)
