"""What a file attached to a teaching case is, told by its content (never by its name or the
type a browser claims): PDF, photos, MP4/WebM video, office documents. Anything else is
refused with the reason."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

from imageshare.domain.errors import ImageShareError

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
