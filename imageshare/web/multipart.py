"""multipart/related for DICOMweb: streaming STOW-RS bodies to staging files, and writing
WADO-RS responses part by part."""

from __future__ import annotations

import io
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart import MultipartParser

from imageshare.archive.ingest import NO_ROOM, out_of_room
from imageshare.domain.errors import ImageShareError, PayloadTooLarge

_CHUNK = 1 << 20
_PIECE = 4 << 20
_MAX_PART_HEADER = 8192  # bytes of one part header (name and value)
_MAX_PART_HEADERS = 64  # headers per part
_MAX_PREAMBLE = 64 << 10  # bytes before the first boundary (RFC 2046 5.1.1 preamble)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    """``value`` split on ``separator`` where it is not inside double quotes (one pass)."""
    parts: list[str] = []
    start, quoted = 0, False
    for index, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return parts


def media_type_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``type/subtype; a=b; c="d"`` into the type and lower-cased parameters (in time
    linear in the length: headers come from anyone)."""
    parts = [p.strip() for p in _split_outside_quotes(value[:_MAX_PART_HEADER], ";")]
    params: dict[str, str] = {}
    for part in parts[1:]:
        if "=" in part:
            key, _, val = part.partition("=")
            params[key.strip().lower()] = val.strip().strip('"')
    return parts[0].lower(), params


@dataclass
class ReceivedPart:
    """One body part written to a staging file."""

    path: Path
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class PartSink:
    """Feeds a multipart body in chunks and writes each part to its own staging file (and
    tells ``on_part`` of each one complete); more than ``max_parts`` parts, or oversized part
    headers, stop it with a reason."""

    def __init__(self, boundary: str, new_file: Callable[[], tuple[BinaryIO, Path]],
                 max_parts: int = 10000,
                 on_part: Callable[[ReceivedPart], None] | None = None) -> None:
        self._new_file = new_file
        self._on_part = on_part  # told of each part once it is complete
        self._max_parts = max_parts
        self._count = 0
        self.parts: list[ReceivedPart] = []
        self._out: BinaryIO | None = None
        self._path: Path | None = None
        self._headers: dict[str, str] = {}
        self._field = b""
        self._value = b""
        self.finished = False
        callbacks = {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_end": self._done,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]  # a TypedDict
        # Until the first boundary: the preamble, which RFC 2046 5.1.1 says to ignore (the
        # parser takes none); kept only as far as a boundary split across chunks needs.
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._preamble: bytearray | None = bytearray()
        self._preamble_seen = 0

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """What of the body so far the parser is to read: nothing while the preamble lasts,
        then everything from the first boundary line on. A preamble longer than 64 KiB is a
        malformed body."""
        assert self._preamble is not None
        seen = self._preamble_seen - len(self._preamble)  # body offset of the kept bytes
        self._preamble += chunk
        self._preamble_seen += len(chunk)
        text, delimiter, start = self._preamble, self._delimiter, 0
        while (at := text.find(delimiter, start)) >= 0:
            after = at + len(delimiter)
            if after >= len(text):
                break  # the boundary may go on in the next chunk
            if seen + at > _MAX_PREAMBLE:
                break
            at_line_start = at == 0 and seen == 0 or at > 0 and text[at - 1:at] == b"\n"
            if at_line_start and text[after:after + 1] in (b"\r", b"\n", b" ", b"\t", b"-"):
                rest = bytes(text[at:])
                self._preamble = None
                return rest
            start = at + 1
        if self._preamble_seen > _MAX_PREAMBLE:
            raise ImageShareError("the multipart body is malformed: no boundary in its "
                                  f"first {_MAX_PREAMBLE >> 10} KiB")
        del self._preamble[:max(0, len(text) - len(delimiter) - 1)]
        return b""

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body (a preamble before the first boundary is
        skipped)."""
        if self._preamble is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return
        try:
            self._parser.write(chunk)
        except ImageShareError:
            raise
        except OSError as exc:  # writing the part failed: not the sender's fault
            if exc.errno in NO_ROOM:
                raise out_of_room() from exc
            raise
        except Exception as exc:  # noqa: BLE001 - the parser's errors mean a malformed body
            raise ImageShareError("the multipart body is malformed") from exc

    def _begin(self) -> None:
        self._count += 1
        if self._count > self._max_parts:
            raise PayloadTooLarge(
                f"the request has more than {self._max_parts} parts (setting stow_max_parts); "
                "send the instances in several requests")
        self._headers = {}
        self._out, self._path = self._new_file()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])

    def _end(self) -> None:
        if self._out is not None and self._path is not None:
            self._out.close()
            part = ReceivedPart(
                self._path, self._headers.get("content-type", ""), dict(self._headers)
            )
            self.parts.append(part)
            self._out = None
            if self._on_part is not None:
                self._on_part(part)
        self._out = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]
        self._check_header()

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._field) + len(self._value) > _MAX_PART_HEADER:
            raise PayloadTooLarge(f"a part header is longer than {_MAX_PART_HEADER} bytes")
        if len(self._headers) >= _MAX_PART_HEADERS:
            raise PayloadTooLarge(f"a part has more than {_MAX_PART_HEADERS} headers")

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode(
            "latin-1"
        ).strip()
        self._field, self._value = b"", b""

    def _done(self) -> None:
        self.finished = True

    def close(self) -> None:
        """Close a part left open by a body that ended early (and remove it); closing never
        raises (its buffered bytes may not fit on a full disk: they are thrown away)."""
        if self._out is not None:
            out, self._out = self._out, None
            try:
                out.close()
            except OSError:
                pass  # the part is discarded; the error that ended the body is the one told
            if self._path is not None:
                self._path.unlink(missing_ok=True)


def new_boundary() -> str:
    """A random multipart boundary."""
    return "imageshare-" + secrets.token_hex(16)


PartBody = bytes | BinaryIO
# A part of a multipart/related answer: (Content-Type, body), or (Content-Type, body,
# Content-Location: the URL of the resource the part is, PS3.18 8.6 and 10.4.3.3.5).
Part = tuple[str, PartBody] | tuple[str, PartBody, str]
_UNSAFE_IN_HEADER = re.compile(r"[^\x21-\x7e]")  # a URL in a header: visible ASCII only


def _part_headers(part: Part) -> bytes:
    """The header lines of one part, with the blank line that ends them."""
    lines = f"Content-Type: {part[0]}\r\n"
    if len(part) == 3:
        # Percent-encoded where it is not visible ASCII, so that no header can be split.
        location = _UNSAFE_IN_HEADER.sub(
            lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), part[2])
        lines += f"Content-Location: {location}\r\n"
    return (lines + "\r\n").encode("ascii", "replace")


def part_stream(boundary: str, parts: Iterable[Part]) -> Iterator[memoryview]:
    """The bytes of a multipart/related body from its parts: (content type, bytes or open
    file), with the part's Content-Location as a third member when it has one.

    Files are read straight into 4 MiB pieces (``readinto``, no intermediate copies) and closed;
    each piece costs the server one hop between threads.
    """
    piece = memoryview(bytearray(_PIECE))
    used = 0
    for part in parts:
        body = part[1]
        for data in (f"--{boundary}\r\n".encode() + _part_headers(part), body, b"\r\n"):
            if isinstance(data, bytes | bytearray | memoryview):
                source: io.BufferedIOBase = io.BytesIO(data)
            else:
                source = data  # type: ignore[assignment]  # an open file: it has readinto
            with source:
                while True:
                    if used == _PIECE:
                        yield piece
                        piece, used = memoryview(bytearray(_PIECE)), 0
                    read = source.readinto(piece[used:])
                    if not read:
                        break
                    used += read
    closing = f"--{boundary}--\r\n".encode()
    if used + len(closing) > _PIECE:
        yield piece[:used]
        piece, used = memoryview(bytearray(len(closing))), 0
    piece[used:used + len(closing)] = closing
    yield piece[:used + len(closing)]


def file_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Read a file in 1 MiB chunks and close it."""
    with stream:
        while chunk := stream.read(_CHUNK):
            yield chunk
