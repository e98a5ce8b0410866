"""HTTP content negotiation for DICOMweb (PS3.18 8.7): parsing Accept and media types.

The parsers walk the header once, character by character (quoted strings included), so
their work is linear in the header's length whatever it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ACCEPT_RANGES = 64


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header: type, lower-cased parameters, quality."""

    media: str
    params: dict[str, str] = field(default_factory=dict)
    quality: float = 1.0

    def param(self, name: str, default: str = "") -> str:
        """A parameter's value (names are compared without case)."""
        return self.params.get(name, default)


def _split(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside double-quoted strings (backslash escapes inside)."""
    parts, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner, out, escaped = value[1:-1], [], False
        for char in inner:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


# Parameters whose values are case-insensitive tokens (a media type, a character set), so
# lower-cased: ``type="Application/DICOM"`` is application/dicom (RFC 2045 5.1, RFC 2387).
_CASELESS_PARAMS = ("type", "charset")


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; a=b; c="d"`` as the lower-cased type and its parameters (names
    lower-cased, values unquoted; the values of ``type`` and ``charset`` lower-cased)."""
    pieces = _split(value, ";")
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, sep, raw = piece.partition("=")
        if sep and name.strip():
            key = name.strip().lower()
            params[key] = _unquote(raw)
            if key in _CASELESS_PARAMS:
                params[key] = params[key].lower()
    return pieces[0].strip().lower(), params


def parse_accept(header: str | None, default: str = "*/*") -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (a missing or empty header
    is ``default``); ranges with quality 0 are dropped, as are ranges past the 64th."""
    text = (header or "").strip() or default
    ranges: list[tuple[float, int, MediaRange]] = []
    for order, item in enumerate(_split(text, ",")[:MAX_ACCEPT_RANGES]):
        if not item.strip():
            continue
        media, params = parse_media_type(item)
        quality = 1.0
        if "q" in params:
            try:
                quality = max(0.0, min(1.0, float(params.pop("q"))))
            except ValueError:
                quality = 1.0
        if quality > 0:
            ranges.append((-quality, order, MediaRange(media, params, quality)))
    return [r for _, _, r in sorted(ranges, key=lambda t: (t[0], t[1]))]


def matches(media_range: MediaRange, media: str) -> bool:
    """Does the range (``*/*``, ``type/*`` or exact) admit ``media``?"""
    wanted = media_range.media
    if wanted in ("*/*", "*"):
        return True
    if wanted.endswith("/*"):
        return media.split("/")[0] == wanted[:-2]
    return wanted == media
