"""What a file attached to a teaching case is, told by its content (never by its name or the
type a browser claims): PDF, photos, MP4/WebM video, office documents. Anything else is
refused with the reason."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

from imageshare.domain.errors import ImageShareError
from imageshare.uploads.convert import copy_streams

# How many bytes of the start of a file are enough to tell its type (an OOXML or ODF package
# is opened as a ZIP instead).
HEAD = 4096


@dataclass(frozen=True)
class FileType:
    """A recognised kind of attachment: its media type, a short kind for pages (pdf, image,
    video, document) and the file extension it is downloaded with."""

    media_type: str
    kind: str
    extension: str

    @property
    def inline(self) -> bool:
        """Whether a browser shows it itself (else it is downloaded)."""
        return self.kind in ("pdf", "image", "video")


PDF = FileType("application/pdf", "pdf", "pdf")
JPEG = FileType("image/jpeg", "image", "jpg")
PNG = FileType("image/png", "image", "png")
GIF = FileType("image/gif", "image", "gif")
WEBP = FileType("image/webp", "image", "webp")
MP4 = FileType("video/mp4", "video", "mp4")
QUICKTIME = FileType("video/quicktime", "video", "mov")
WEBM = FileType("video/webm", "video", "webm")
_OOXML = {
    "word/": FileType("application/vnd.openxmlformats-officedocument.wordprocessingml."
                      "document", "document", "docx"),
    "ppt/": FileType("application/vnd.openxmlformats-officedocument.presentationml."
                     "presentation", "document", "pptx"),
    "xl/": FileType("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                    "document", "xlsx"),
}
_ODF = {
    "application/vnd.oasis.opendocument.text": "odt",
    "application/vnd.oasis.opendocument.presentation": "odp",
    "application/vnd.oasis.opendocument.spreadsheet": "ods",
}
OLE = FileType("application/vnd.ms-office", "document", "ole")

ACCEPTED = ("PDF, JPEG, PNG, GIF or WebP photos, MP4, MOV or WebM video, Word, PowerPoint, "
            "Excel or OpenDocument files")


def sniff(content: bytes) -> FileType:
    """The type of ``content``; ImageShareError naming what is accepted otherwise."""
    head = content[:HEAD]
    if head.startswith(b"%PDF-"):
        return PDF
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    if head[4:8] == b"ftyp":
        return QUICKTIME if head[8:12] == b"qt  " else MP4
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        if b"webm" in head[:64]:
            return WEBM
        raise ImageShareError(f"Matroska video other than WebM is not accepted; {ACCEPTED}")
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return OLE
    if head.startswith(b"PK\x03\x04"):
        found = _package(content)
        if found is not None:
            return found
    raise ImageShareError(f"this kind of file cannot be attached; attach {ACCEPTED}")


def _package(content: bytes) -> FileType | None:
    """An office document inside a ZIP package (OOXML or OpenDocument), or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as package:
            names = package.namelist()
            if "mimetype" in names:
                info = package.getinfo("mimetype")
                if info.file_size <= 128:
                    media = package.read("mimetype").decode("ascii", "replace").strip()
                    if media in _ODF:
                        return FileType(media, "document", _ODF[media])
            if "[Content_Types].xml" in names:
                for prefix, kind in _OOXML.items():
                    if any(n.startswith(prefix) for n in names):
                        return kind
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return None
    return None


# -- what a photo or video says besides its picture --------------------------------------------

_DAMAGED = "the {} cannot be read (damaged): it was not attached"


def without_metadata(content: bytes, found: FileType) -> bytes:
    """A photo's bytes without what it says besides its picture, the picture itself untouched
    (not re-encoded): EXIF (a description, the author, the camera's owner, where it was
    taken), XMP, IPTC, comments, text chunks and whatever trails the image. A JPEG keeps which
    way up it is shown (its EXIF orientation alone) and its colour profile. Other kinds are
    returned as they are. ImageShareError when the photo cannot be read."""
    strip = {JPEG: _jpeg, PNG: _png, WEBP: _webp, GIF: _gif}.get(found)
    if strip is None:
        return content
    try:
        return strip(content)
    except (IndexError, ValueError) as exc:
        raise ImageShareError(_DAMAGED.format("photo")) from exc


def _jpeg_orientation(content: bytes) -> int:
    """The EXIF orientation of a JPEG (1, as stored, when it says none)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(content)) as image:
            value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: shown as stored
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _jpeg(content: bytes) -> bytes:
    """JPEG markers kept: the frame and its tables, JFIF (APP0), the ICC profile (APP2) and
    Adobe's colour transform (APP14); every other APPn and COM segment is left out, and
    nothing after the image's end."""
    from PIL import Image

    if content[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    kept: list[bytes] = []
    position, end = 2, len(content)
    while position < end:
        if content[position] != 0xFF:
            raise ValueError("a JPEG marker was expected")
        marker = content[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # end of image: whatever trails it (another image, a maker's
            break           # trailer) is not the picture
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            kept.append(content[position:position + 2])
            position += 2
            continue
        length = int.from_bytes(content[position + 2:position + 4], "big")
        if length < 2 or position + 2 + length > end:
            raise ValueError("a JPEG segment runs past the file")
        segment = content[position:position + 2 + length]
        payload = segment[4:]
        if (not (0xE0 <= marker <= 0xEF or marker == 0xFE)
                or (marker == 0xE0 and payload.startswith(b"JFIF\0"))
                or (marker == 0xE2 and payload.startswith(b"ICC_PROFILE\0"))
                or (marker == 0xEE and payload.startswith(b"Adobe"))):
            kept.append(segment)
        position += 2 + length
        if marker == 0xDA:  # a scan: its coded data runs to the next marker
            scan = position
            while True:
                found = content.find(b"\xff", scan)
                if found < 0 or found + 1 >= end:
                    raise ValueError("the JPEG ends inside a scan")
                following = content[found + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    scan = found + 1
                    continue
                break
            kept.append(content[position:found])
            position = found
    else:
        raise ValueError("the JPEG has no end")
    orientation = _jpeg_orientation(content)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = exif.tobytes()
        at = 1 if kept and kept[0][:2] == b"\xff\xe0" else 0
        kept.insert(at, b"\xff\xe1" + (len(data) + 2).to_bytes(2, "big") + data)
    return b"\xff\xd8" + b"".join(kept) + b"\xff\xd9"


# Ancillary PNG chunks about the picture itself (colour, transparency, animation, pixel size);
# every other ancillary chunk (tEXt, zTXt, iTXt, eXIf, tIME, a maker's own) is left out.
_PNG_KEPT = {b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"bKGD", b"hIST",
             b"sPLT", b"acTL", b"fcTL", b"fdAT", b"cICP", b"mDCV", b"cLLI"}


def _png(content: bytes) -> bytes:
    signature = b"\x89PNG\r\n\x1a\n"
    if not content.startswith(signature):
        raise ValueError("not a PNG")
    kept, position = [signature], len(signature)
    while True:
        if position + 12 > len(content):
            raise ValueError("the PNG has no end")
        length = int.from_bytes(content[position:position + 4], "big")
        kind = content[position + 4:position + 8]
        chunk = content[position:position + 12 + length]
        if len(chunk) != 12 + length:
            raise ValueError("a PNG chunk runs past the file")
        if kind[:1].isupper() or kind in _PNG_KEPT:
            kept.append(chunk)
        position += 12 + length
        if kind == b"IEND":
            return b"".join(kept)


def _webp(content: bytes) -> bytes:
    """WebP without its EXIF and XMP chunks (and the extended header's flags for them)."""
    if content[:4] != b"RIFF" or content[8:12] != b"WEBP":
        raise ValueError("not a WebP")
    end = min(len(content), 8 + int.from_bytes(content[4:8], "little"))
    kept, position = [], 12
    while position + 8 <= end:
        kind = content[position:position + 4]
        length = int.from_bytes(content[position + 4:position + 8], "little")
        chunk = bytearray(content[position:position + 8 + length + (length & 1)])
        if len(chunk) < 8 + length:
            raise ValueError("a WebP chunk runs past the file")
        if kind == b"VP8X":
            chunk[8] &= ~0x0C & 0xFF  # no EXIF, no XMP
        if kind in (b"VP8X", b"VP8 ", b"VP8L", b"ALPH", b"ANIM", b"ANMF", b"ICCP"):
            kept.append(bytes(chunk))
        position += 8 + length + (length & 1)
    body = b"WEBP" + b"".join(kept)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _gif_blocks(content: bytes, position: int) -> int:
    """Where the data sub-blocks starting at ``position`` end (after their terminator)."""
    while True:
        size = content[position]
        position += 1 + size
        if size == 0:
            return position


def _gif(content: bytes) -> bytes:
    """GIF without comment extensions and application extensions other than looping."""
    if content[:6] not in (b"GIF87a", b"GIF89a"):
        raise ValueError("not a GIF")
    flags = content[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    kept = [content[:position]]
    while True:
        block = content[position]
        if block == 0x3B:  # trailer
            kept.append(b"\x3b")
            return b"".join(kept)
        if block == 0x2C:  # an image: descriptor, local colour table, LZW data
            local = content[position + 9]
            start = position + 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            end = _gif_blocks(content, start + 1)
            kept.append(content[position:end])
        elif block == 0x21:
            label = content[position + 1]
            end = _gif_blocks(content, position + 2)
            application = content[position + 3:position + 14]
            if label in (0xF9, 0x01) or (label == 0xFF and application in (
                    b"NETSCAPE2.0", b"ANIMEXTS1.0")):
                kept.append(content[position:end])
        else:
            raise ValueError("an unknown GIF block")
        if end > len(content):
            raise ValueError("a GIF block runs past the file")
        position = end


# Container and stream tags that say nothing about who or where (ffmpeg's own and the file
# format's); any other (location, title, make, model, creation time, a phone's own keys) means
# the video is written again without them.
_HARMLESS_TAGS = {"major_brand", "minor_version", "compatible_brands", "encoder",
                  "handler_name", "vendor_id", "language"}
_CONTAINERS = {MP4: "mp4", QUICKTIME: "mov", WEBM: "webm"}


def video_without_metadata(source: Any, target: Any, found: FileType) -> bool:
    """Write ``source``'s video and sound streams, as they are (not re-encoded), to
    ``target`` (open files) without the container's and the streams' metadata (where it was
    filmed, the device, the owner's details) when it has any; returns False (nothing
    written) when it has none, so the file is kept as it is. ImageShareError when it cannot
    be read."""
    import av

    container_format = _CONTAINERS.get(found)
    if container_format is None:
        return False
    try:
        with av.open(source) as src:
            tags = [src.metadata, *(s.metadata for s in src.streams)]
            if all(key in _HARMLESS_TAGS for found_tags in tags for key in found_tags):
                return False
            with av.open(target, "w", format=container_format) as dst:
                copy_streams(src, dst)
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise ImageShareError(_DAMAGED.format("video")) from exc
    return True


# -- what a document says about who wrote it ---------------------------------------------------

# Office packages of at most this many bytes once unpacked are written again (a ZIP bomb is
# refused before any of it is unpacked).
MAX_UNPACKED = 512 << 20
# The document properties of a package, each replaced by an empty one of its kind (removing
# the part would leave the package's relationships pointing at nothing).
_EMPTY_PARTS = {
    "docProps/core.xml": (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<cp:coreProperties '
        'xmlns:cp="http://schemas.openxmlformats.org/package/2006/metadata/core-properties" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:dcterms="http://purl.org/dc/terms/" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"/>'),
    "docProps/app.xml": (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Properties xmlns="http://'
        'schemas.openxmlformats.org/officeDocument/2006/extended-properties"/>'),
    "docProps/custom.xml": (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<Properties xmlns="http://'
        'schemas.openxmlformats.org/officeDocument/2006/custom-properties" xmlns:vt="http://'
        'schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes"/>'),
    "meta.xml": (
        '<?xml version="1.0" encoding="UTF-8"?>\n<office:document-meta xmlns:office="urn:'
        'oasis:names:tc:opendocument:xmlns:office:1.0" office:version="1.2"><office:meta/>'
        '</office:document-meta>'),
}


def document_without_metadata(source: Any, target: Any, found: FileType) -> bool:
    """Write ``source`` (an open PDF or office file) to ``target`` without what it says about
    who made it: a PDF's document information (author, title, subject, keywords, the making
    program) and XMP metadata; an OOXML or OpenDocument package's document properties (author,
    last editor, company, manager, custom properties). The pages and their text are kept as
    they are. Refused (ImageShareError, with what to do) when it cannot be kept without
    them: a legacy Office file (.doc, .ppt, .xls), whose title, subject, author and comments
    cannot be taken out, or a document carrying macros (which would run on the
    learners' computers); also when the document cannot be read."""
    if found == PDF:
        return _pdf(source, target)
    if found == OLE:
        raise ImageShareError(
            "legacy Office files (.doc, .ppt, .xls) keep their title, author and comments "
            "where they cannot be taken out: save it as .docx, .pptx, .xlsx or PDF and "
            "attach that; it was not attached")
    if found.kind == "document":
        return _office_package(source, target)
    return False


def _is_macro_part(name: str) -> bool:
    """Whether a package part is a macro project (OOXML ``vbaProject.bin``, OpenDocument
    ``Basic/`` or ``Scripts/``)."""
    lowered = name.lower()
    return (lowered.endswith("vbaproject.bin") or lowered.startswith(("basic/", "scripts/"))
            or lowered.endswith("vbadata.xml"))


def _pdf(source: Any, target: Any) -> bool:
    from pypdf import PdfReader, PdfWriter
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(source, strict=False)
        if reader.is_encrypted:
            raise ImageShareError("the PDF is encrypted: attach it without a password")
        writer = PdfWriter(clone_from=reader)
        writer.metadata = None
        root = writer.root_object
        if "/Metadata" in root:
            del root["/Metadata"]
        for page in writer.pages:
            if "/Metadata" in page:
                del page["/Metadata"]
        writer.write(target)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, RecursionError) as exc:
        raise ImageShareError(_DAMAGED.format("PDF")) from exc
    return True


def _office_package(source: Any, target: Any) -> bool:
    try:
        with zipfile.ZipFile(source) as package:
            entries = package.infolist()
            if any(_is_macro_part(e.filename) for e in entries):
                raise ImageShareError("documents with macros are not attached (they would run "
                                      "on the learners' computers): save it without macros "
                                      "(.docx, .pptx, .xlsx) and attach that")
            if sum(e.file_size for e in entries) > MAX_UNPACKED:
                raise ImageShareError(f"the document unpacks to more than {MAX_UNPACKED >> 20} "
                                      "MB: it was not attached")
            with zipfile.ZipFile(target, "w") as cleaned:
                for entry in entries:
                    empty = _EMPTY_PARTS.get(entry.filename)
                    if empty is not None:
                        cleaned.writestr(entry, empty.encode(), compress_type=entry.compress_type)
                        continue
                    with package.open(entry) as part, cleaned.open(entry, "w") as out:
                        while chunk := part.read(1 << 20):
                            out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, KeyError,
            NotImplementedError, EOFError) as exc:
        raise ImageShareError(_DAMAGED.format("document")) from exc
    return True
