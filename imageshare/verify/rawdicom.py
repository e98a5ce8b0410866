"""A small reader of Part 10 bytes for the verifier: every element at any depth as it is
stored (path, tag, VR, value bytes), without building pydicom data sets, so that checking an
output costs little next to making it. Little endian (explicit or implicit VR) only; other
encodings are read with pydicom by the caller.

UN values of undefined length are read as the implicit VR sequences they are. Pixel data at
the top level is not returned: its place is (native samples), or its items and what its
frames hold outside their coded data are (encapsulated: JPEG and JPEG 2000 marker segments,
anything between or after the segments of RLE frames), for the raw-bytes search. Pixel data
in a sequence item is returned as an element (encapsulated: its fragments as stored), for
the caller to report.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR

UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}
_MAX_DEPTH = 16


@dataclass(frozen=True)
class RawElement:
    """One stored element: its path of (tag, item index, ...) and where to say it is."""

    path: tuple[int, ...]
    tag: int
    vr: str
    value: bytes
    where: str


@dataclass
class RawFile:
    """What the reader found in a file."""

    elements: list[RawElement] = field(default_factory=list)
    top: dict[int, bytes] = field(default_factory=dict)  # top-level values, by tag
    sequences: set[int] = field(default_factory=set)  # top-level sequences, by tag
    pixel_texts: list[bytes] = field(default_factory=list)  # of compressed frames, to search
    native_pixels: bool = False
    encapsulated_pixels: bool = False
    pixel_region: tuple[int, int] = (0, 0)  # where the top-level pixel data element is
    syntax: str = ""
    # encapsulated: every item (the basic offset table first) as (start of its value, length)
    pixel_items: list[tuple[int, int]] = field(default_factory=list)


def _vr_of(tag: int) -> str:
    if (tag >> 16) % 2:
        return "UN" if tag & 0xFF00 else "LO"  # private data, or a private creator
    try:
        choices = dictionary_VR(tag).split(" or ")
    except KeyError:
        return "UN"
    # "US or OW" (LUT Data), "US or SS or OW": read as the bytes they may be, not as numbers
    return next((vr for vr in choices if vr in ("OB", "OW")), choices[0])


def label(tag: int) -> str:
    """How a finding names an element: its tag and keyword."""
    from pydicom.datadict import keyword_for_tag

    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})" + (f" {keyword}" if keyword else "")


class _Reader:
    def __init__(self, data: bytes, found: RawFile) -> None:
        self.data = data
        self.found = found

    def elements(self, pos: int, end: int, implicit: bool, path: tuple[int, ...],
                 where: str, depth: int) -> int:
        """Read elements from ``pos`` to ``end`` or to an item delimiter; returns the
        position after what was read."""
        data = self.data
        while pos < end:
            if pos + 8 > end:
                raise ValueError("truncated element")
            group, element = struct.unpack_from("<HH", data, pos)
            if group == 0xFFFE:
                if element == 0xE00D:
                    return pos + 8
                raise ValueError("unexpected delimiter")
            tag = (group << 16) | element
            if implicit:
                vr = _vr_of(tag)
                (length,) = struct.unpack_from("<L", data, pos + 4)
                start = pos + 8
            else:
                raw_vr = data[pos + 4:pos + 6]
                vr = raw_vr.decode("latin-1")
                if raw_vr in _LONG_VRS:
                    (length,) = struct.unpack_from("<L", data, pos + 8)
                    start = pos + 12
                else:
                    (length,) = struct.unpack_from("<H", data, pos + 6)
                    start = pos + 8
            if depth == 0 and tag in _PIXEL_TAGS:
                after = self.pixels(start, length, end)
                if self.found.pixel_region == (0, 0):
                    self.found.pixel_region = (pos, after)
                pos = after
                continue
            if tag in _PIXEL_TAGS and length == UNDEFINED:
                # encapsulated pixel data in a sequence item: its fragments, as one value
                after = self.fragments_end(start, end)
                self.found.elements.append(
                    RawElement((*path, tag), tag, vr, data[start:after], where))
                pos = after
                continue
            if vr == "SQ" or length == UNDEFINED:
                if depth == 0:
                    self.found.sequences.add(tag)
                if depth >= _MAX_DEPTH:
                    raise ValueError("sequences nested too deep")
                pos = self.sequence(start, length, end, implicit or vr == "UN", path, tag,
                                    f"{where}{label(tag)}", depth + 1)
                continue
            stop = start + length
            if stop > end:
                raise ValueError("element longer than its data set")
            value = data[start:stop]
            if depth == 0:
                self.found.top[tag] = value
            self.found.elements.append(RawElement((*path, tag), tag, vr, value, where))
            pos = stop
        return pos

    def sequence(self, pos: int, length: int, end: int, implicit: bool, path: tuple[int, ...],
                 tag: int, label: str, depth: int) -> int:
        """Read a sequence's items; returns the position after the sequence."""
        data = self.data
        stop = pos + length if length != UNDEFINED else end
        if stop > end:
            raise ValueError("sequence longer than its data set")
        index = 0
        while pos < stop:
            group, element, item_length = struct.unpack_from("<HHL", data, pos)
            if (group, element) == (0xFFFE, 0xE0DD):
                return pos + 8
            if (group, element) != (0xFFFE, 0xE000):
                raise ValueError("malformed sequence")
            item_path = (*path, tag, index)
            where = f"{label}[{index + 1}] > "
            if item_length == UNDEFINED:
                pos = self.elements(pos + 8, stop, implicit, item_path, where, depth)
            else:
                if pos + 8 + item_length > stop:
                    raise ValueError("item longer than its sequence")
                self.elements(pos + 8, pos + 8 + item_length, implicit, item_path, where,
                              depth)
                pos += 8 + item_length
            index += 1
        return pos

    def fragments_end(self, pos: int, end: int) -> int:
        """Where the fragments of encapsulated data starting at ``pos`` end (after their
        sequence delimiter)."""
        while True:
            if pos + 8 > end:
                raise ValueError("encapsulated pixel data without its end")
            group, element, item_length = struct.unpack_from("<HHL", self.data, pos)
            if (group, element) == (0xFFFE, 0xE0DD):
                return pos + 8
            if (group, element) != (0xFFFE, 0xE000) or item_length == UNDEFINED:
                raise ValueError("malformed encapsulated pixel data")
            pos += 8 + item_length

    def pixels_a_plane(self) -> int:
        """Rows times columns: what each RLE segment decodes to (0 when unknown)."""
        rows, columns = self.found.top.get(0x00280010, b""), self.found.top.get(0x00280011, b"")
        if len(rows) < 2 or len(columns) < 2:
            return 0
        return int(struct.unpack("<H", rows[:2])[0]) * int(struct.unpack("<H", columns[:2])[0])

    def pixels(self, start: int, length: int, end: int) -> int:
        """Pixel data: native samples are skipped; of encapsulated data everything in its
        frames but the coded image is kept for the raw-bytes search."""
        if length != UNDEFINED:
            if start + length > end:
                raise ValueError("pixel data longer than the file")
            self.found.native_pixels = True
            return start + length
        self.found.encapsulated_pixels = True
        pos = start
        fragments: list[tuple[int, int]] = []
        while True:
            if pos + 8 > end:
                raise ValueError("encapsulated pixel data without its end")
            group, element, item_length = struct.unpack_from("<HHL", self.data, pos)
            if (group, element) == (0xFFFE, 0xE0DD):
                self.found.pixel_texts = frame_texts(self.data, fragments[1:],
                                                     self.pixels_a_plane())
                self.found.pixel_items = fragments
                return pos + 8
            if (group, element) != (0xFFFE, 0xE000) or item_length == UNDEFINED:
                raise ValueError("malformed encapsulated pixel data")
            fragments.append((pos + 8, item_length))
            pos += 8 + item_length
            if pos > end:
                raise ValueError("encapsulated pixel data longer than the file")


def read(data: bytes) -> RawFile | None:
    """Every element of a little-endian Part 10 file; None when it is not one (big endian,
    deflated, no preamble) and pydicom must read it."""
    if data[128:132] != b"DICM":
        return None
    found = RawFile()
    reader = _Reader(data, found)
    pos = 132
    # the file meta group: explicit VR little endian, group 0002 only
    while pos + 8 <= len(data):
        (group,) = struct.unpack_from("<H", data, pos)
        if group != 0x0002:
            break
        raw_vr = data[pos + 4:pos + 6]
        if raw_vr in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            start = pos + 8
        tag = (group << 16) | struct.unpack_from("<H", data, pos + 2)[0]
        value = data[start:start + length]
        found.elements.append(RawElement((tag,), tag, raw_vr.decode("latin-1"), value, ""))
        if tag == 0x00020010:
            found.syntax = value.decode("ascii", "replace").strip(" \0")
        pos = start + length
    if found.syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        return None  # big endian, deflated
    implicit = found.syntax == "1.2.840.10008.1.2"
    reader.elements(pos, len(data), implicit, (), "", 0)
    return found


_STARTS = (b"\xff\xd8", b"\xff\x4f")  # of a JPEG (-LS, lossless) and a JPEG 2000 frame


def frame_texts(data: bytes, fragments: list[tuple[int, int]], samples: int = 0
                ) -> list[bytes]:
    """Of the compressed frames in ``fragments`` ((start, length) in ``data``), every byte
    that is not coded image: JPEG and JPEG 2000 marker segments, anything after the end of
    the image, and the whole frame when its markers cannot be followed; UTF-16 text is also
    given with its zero bytes taken out."""
    frames: list[bytes] = []
    for start, length in fragments:
        fragment = bytes(data[start:start + length])
        if frames and frames[-1].startswith(_STARTS) and not fragment.startswith(_STARTS):
            frames[-1] += fragment  # a JPEG frame continued in the next fragment
        else:
            frames.append(fragment)
    texts: list[bytes] = []
    for frame in frames:
        try:
            parts = _outside_coded_data(frame, samples)
        except (ValueError, IndexError, struct.error):
            parts = [frame]
        texts += parts
        texts += [part.replace(b"\0", b"") for part in parts if b"\0" in part]
    return texts


def _outside_coded_data(frame: bytes, samples: int = 0) -> list[bytes]:
    """The parts of one JPEG or JPEG 2000 frame that are not entropy-coded (tile) data."""
    if frame.startswith(b"\xff\x4f"):
        return _j2k_headers(frame)
    if _rle(frame):
        return _rle_texts(frame, samples)
    if not frame.startswith(b"\xff\xd8"):
        return [frame[:4096]]  # video and others: headers only
    parts: list[bytes] = []
    pos = 2
    while True:
        if frame[pos] != 0xFF:
            raise ValueError("marker expected")
        marker = frame[pos + 1]
        if marker == 0xFF:
            pos += 1
        elif marker == 0xD9:
            return [*parts, frame[pos + 2:]]
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
        else:
            length = int.from_bytes(frame[pos + 2:pos + 4], "big")
            parts.append(frame[pos + 4:pos + 2 + length])
            pos += 2 + length
            if marker == 0xDA:  # coded data follows, up to the next marker
                while not (frame[pos] == 0xFF and frame[pos + 1] >= 0xC0
                           and not 0xD0 <= frame[pos + 1] <= 0xD7
                           and frame[pos + 1] != 0xFF):
                    pos = frame.index(b"\xff", pos + 1)


def _rle_texts(frame: bytes, samples: int) -> list[bytes]:
    """What an RLE frame holds outside its coded data, where no decoder looks: its header,
    and whatever follows each segment's coded data (``samples`` bytes once decoded) up to the
    next segment or the end of the frame. Each segment's run headers are followed, not the
    whole frame searched (fast: one step per run). Without ``samples``: the whole frame."""
    if samples <= 0:
        return [frame]
    count, *offsets = struct.unpack_from("<16L", frame)
    bounds = [*offsets[:count], len(frame)]
    parts = [frame[:64]]
    for first, limit in zip(bounds, bounds[1:], strict=False):
        position, decoded = first, 0
        while decoded < samples and position < limit:
            header = frame[position]
            if header < 128:
                position += header + 2
                decoded += header + 1
            elif header > 128:
                position += 2
                decoded += 257 - header
            else:
                position += 1
        if position < limit:
            parts.append(frame[position:limit])
    return parts


def _rle(frame: bytes) -> bool:
    """True for an RLE frame (PS3.5 G.3): its header counts 1 to 15 segments, the first at
    byte 64, and every offset of a segment lies within the frame and after the one before."""
    if len(frame) < 64:
        return False
    count, *offsets = struct.unpack_from("<16L", frame)
    if not 1 <= count <= 15 or offsets[0] != 64:
        return False
    used = offsets[:count]
    return all(a < b for a, b in zip(used, used[1:], strict=False)) and used[-1] <= len(frame) \
        and not any(offsets[count:])


def _j2k_headers(frame: bytes) -> list[bytes]:
    """JPEG 2000: the main header, each tile-part header, and what follows the end."""
    parts: list[bytes] = []
    pos = 2
    while True:
        marker = frame[pos:pos + 2]
        if marker == b"\xff\xd9":
            return [*parts, frame[pos + 2:]]
        if marker == b"\xff\x90":  # a tile-part: its header up to SOD, then its data
            (psot,) = struct.unpack_from(">L", frame, pos + 6)
            data_at = frame.index(b"\xff\x93", pos)
            parts.append(frame[pos:data_at])
            if psot == 0:
                return [*parts, frame[frame.rindex(b"\xff\xd9") + 2:]]
            pos += psot
        elif marker[:1] == b"\xff":
            length = int.from_bytes(frame[pos + 2:pos + 4], "big")
            parts.append(frame[pos + 4:pos + 2 + length])
            pos += 2 + length
        else:
            raise ValueError("marker expected")
