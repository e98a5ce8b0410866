"""Importing files, folders, zip files and CD/DVD media (DICOMDIR) through the one pipeline.

Every zip file the walker opens (whatever its name or first bytes: a zip file is found from
its end, so bytes put before it do not hide it) is checked against :class:`ZipLimits` before
any member is read, and each member is read through a counter that stops at its stated size
and at the walk's allowance of expanded bytes: the stated sizes are never trusted alone.

A walk given a budget of items (an upload's: files met, files a DICOMDIR lists and members
of zip files all count) reads no more, so that a small upload cannot make it copy, hash and
store without end: a zip file that does not fit in what is left is
refused whole, and the walk stops there, saying so. A DICOMDIR is read one record at a time,
only when its size is sane (:data:`MAX_DICOMDIR_BYTES`), and each file it lists is read once
however often, or under whatever spelling, it is listed; one that lists more than the budget
is not used, and its folder is read file by file instead (every real file is still found).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO, cast

from pydicom import Dataset, dcmread
from pydicom.filereader import read_partial, read_sequence_item

from imageshare.archive.ingest import IngestService
from imageshare.domain.actors import Actor
from imageshare.domain.errors import ConflictingInstance, InvalidInstance

_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_ID_SEPARATOR = "\\"  # between the components of a Referenced File ID
_RECORDS = 0x00041220  # Directory Record Sequence

MAX_DICOMDIR_BYTES = 32 << 20  # a DICOMDIR larger than this is not read
# A DICOMDIR holds a record (a sequence item) per patient, study, series and file, and now and
# then an item within a record (an icon): at most this many items per file it may list, and a
# few more for the smallest media. Items are counted in its bytes before any is parsed.
_ITEMS_PER_FILE = 4
_FEW_ITEMS = 16
_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00")  # (FFFE,E000) little, big endian
# The central directory of a zip file takes some 100 bytes per member; one stating more bytes
# per member than this (on average) is not opened (reading it costs memory before any check).
_CENTRAL_ENTRY_BYTES = 512


@dataclass
class ImportReport:
    """What an import did: counts and every refusal with its reason."""

    stored: int = 0
    duplicates: int = 0
    kept_first: int = 0
    replaced: int = 0
    held: int = 0
    skipped: int = 0
    repeated: int = 0  # files a DICOMDIR lists more than once (read once)
    refused: list[tuple[str, str]] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)

    def summary(self) -> str:
        """One line for people."""
        return (
            f"{self.stored} stored, {self.duplicates} duplicates, {self.kept_first} kept "
            f"(different content, stored copy kept), {self.replaced} replaced, "
            + (f"{self.held} held for reconciliation (patient details differ), "
               if self.held else "")
            + (f"{self.repeated} listed again on the media (read once), "
               if self.repeated else "")
            + f"{len(self.refused)} refused, {self.skipped} skipped (not DICOM); "
            f"{len(self.studies)} studies"
        )



@dataclass(frozen=True)
class ZipLimits:
    """Limits on a zip file, checked before anything in it is read."""

    max_members: int = 10_000
    max_total_bytes: int = 8 << 30  # expanded, all members together
    # uncompressed / compressed: per member (above 1 MiB) and for the whole zip file
    max_ratio: int = 200


_SMALL = 1 << 20  # members (and zip files) expanding to less than this escape the ratio rule


class ZipExpandsTooFar(InvalidInstance):
    """A zip member gave more bytes than the zip file states, or more than the walk allows."""


def zip_refusal(archive: zipfile.ZipFile, size: int, limits: ZipLimits,
                allowance: int | None = None, limit_text: str = "the limit") -> str:
    """"" when the zip file (``size`` bytes on disk) may be read; else why it is refused (a
    zip bomb, too many members, or more expanded bytes than ``allowance``, when given, left
    of ``limit_text``)."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        return f"the zip file holds more than {limits.max_members} files"
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > _SMALL and info.file_size > limits.max_ratio * max(
                info.compress_size, 1):
            return "the zip file expands far beyond its size (refused as a zip bomb)"
    if total > _SMALL and total > limits.max_ratio * max(size, 1):
        return "the zip file expands far beyond its size (refused as a zip bomb)"
    if total > limits.max_total_bytes:
        return (f"the zip file expands to more than {limits.max_total_bytes >> 30} GB "
                "(refused as a zip bomb)")
    if allowance is not None and total > allowance:
        return (f"the zip file expands to {_megabytes(total)} MB, more than {limit_text} "
                f"allows ({max(allowance, 0) >> 20} MB left); nothing in it was used")
    return ""


def _megabytes(count: int) -> int:
    return -(-count // (1 << 20))  # rounded up: never "0 MB" for a few bytes over


class _Allowance:
    """Expanded bytes a walk may take from zip members (None: only the zip limits)."""

    def __init__(self, limit: int | None, text: str) -> None:
        self.limit = limit
        self.text = text
        self.left = limit  # what the zip files checked so far leave of it, by stated sizes
        self._lock = threading.Lock()
        self._read: dict[int, int] = {}
        self._total = 0

    def take(self, stated: int) -> None:
        """A zip file stating ``stated`` expanded bytes was let through."""
        with self._lock:
            if self.left is not None:
                self.left -= stated

    def claim(self, count: int) -> bool:
        """Take ``count`` bytes more than the walk read (what a file grows to when it is
        converted); False, taking nothing, when they are not left."""
        with self._lock:
            if self.left is None or self.limit is None:
                return True
            if count > self.left or self._total + count > self.limit:
                return False
            self.left -= count
            self._total += count
            return True

    def reached(self, member: int, position: int, stated: int) -> None:
        """Member ``member`` was read up to ``position``: ZipExpandsTooFar past its stated
        size, or when the bytes read of all members (each counted once, at the most read of
        it: a member is opened several times) pass the limit."""
        if position > stated:
            raise ZipExpandsTooFar("a file in the zip file is larger than the zip file "
                                   "states (refused as a zip bomb)")
        with self._lock:
            before = self._read.get(member, 0)
            if position > before:
                self._read[member] = position
                self._total += position - before
            if self.limit is not None and self._total > self.limit:
                raise ZipExpandsTooFar(f"the zip files expand to more than {self.text} "
                                       "allows (refused)")


class _CountedMember:
    """A zip member's stream that stops at its stated size and the walk's allowance."""

    def __init__(self, raw: IO[bytes], member: int, declared: int,
                 allowance: _Allowance) -> None:
        self._raw = raw
        self._member = member
        self._declared = declared
        self._allowance = allowance
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (never more than one byte past the stated size is asked
        for, so a member that lies is caught without reading on)."""
        left = self._declared + 1 - self._position
        want = left if size is None or size < 0 else min(size, left)
        data = self._raw.read(want) if want > 0 else b""
        self._position += len(data)
        self._allowance.reached(self._member, self._position, self._declared)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._position = self._raw.seek(offset, whence)
        return self._position

    def tell(self) -> int:
        return self._position

    def seekable(self) -> bool:
        return bool(self._raw.seekable())

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return bool(self._raw.closed)

    def __enter__(self) -> _CountedMember:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open(path, "rb")

    return opener


def _member_opener(archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                   allowance: _Allowance) -> Callable[[], BinaryIO]:
    member = id(info)

    def opener() -> BinaryIO:
        return cast(BinaryIO, _CountedMember(archive.open(info), member, info.file_size,
                                             allowance))

    return opener

@dataclass(frozen=True)
class Candidate:
    """A file to import: a label for reports and how to open it; ``explicit``: named by
    itself (listed in a DICOMDIR, or given as a file); ``on_media``: found in a folder of
    a CD beside its DICOMDIR, which does not list it (a viewer program's file, unless it
    is DICOM)."""

    label: str
    open: Callable[[], BinaryIO]
    explicit: bool = False
    on_media: bool = False


def _is_part10(stream: BinaryIO) -> bool:
    head = stream.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


class OutsideTheMedia(Exception):
    """A path that would leave the media, or a symbolic link, or not a regular file; the
    message says which, never where it points."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _check_component(part: str) -> None:
    if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
        raise OutsideTheMedia("outside the media (refused)")


# Folders' names by their case-folded spelling, by folder (device, inode): one walk lists each
# folder once, however many of its names are looked up.
FolderNames = dict[tuple[int, int], dict[str, str]]


def _actual_name(dir_fd: int, part: str, names: FolderNames | None = None) -> str:
    """``part`` as it is spelt in the folder (CD media names are upper case, mounted file
    systems vary); the name itself when absent. ``names`` keeps folders' listings."""
    try:
        os.stat(part, dir_fd=dir_fd, follow_symlinks=False)
        return part
    except FileNotFoundError:
        pass
    facts = os.fstat(dir_fd)
    known = names.get((facts.st_dev, facts.st_ino)) if names is not None else None
    if known is None:
        # the first name in sorted order wins when several fold alike
        known = {name.lower(): name for name in sorted(os.listdir(dir_fd), reverse=True)}
        if names is not None:
            names[(facts.st_dev, facts.st_ino)] = known
    return known.get(part.lower(), part)


def open_inside(root: Path, parts: list[str] | tuple[str, ...],
                names: FolderNames | None = None) -> BinaryIO:
    """Open the regular file ``root/parts[0]/.../parts[-1]`` for reading without leaving
    ``root`` and without following a symbolic link at any step (each component is opened
    relative to its folder with O_NOFOLLOW, so nothing can be swapped in between). Raises
    :class:`OutsideTheMedia` or :class:`FileNotFoundError`. ``names`` (when given) keeps the
    listings of folders whose names were looked up, for the next call."""
    if not parts:
        raise OutsideTheMedia("outside the media (refused)")
    for part in parts:
        _check_component(part)
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                fd = os.open(_actual_name(dir_fd, part, names), _DIR_FLAGS, dir_fd=dir_fd)
            except NotADirectoryError as exc:
                raise OutsideTheMedia("a symbolic link or not a folder (not followed)") from exc
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OutsideTheMedia("a symbolic link (not followed)") from exc
                raise
            os.close(dir_fd)
            dir_fd = fd
        name = _actual_name(dir_fd, parts[-1], names)
        try:
            # Looked at before it is opened: opening a device or a pipe has effects of its
            # own (a tape rewinds, a waiting writer goes on), whatever is read afterwards.
            kind = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if stat.S_ISLNK(kind):
                raise OutsideTheMedia("a symbolic link (not followed)")
            if not stat.S_ISREG(kind):
                raise OutsideTheMedia("not a regular file (refused)")
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutsideTheMedia("a symbolic link (not followed)") from exc
            raise
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutsideTheMedia("not a regular file (refused)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _file_ids(record: Dataset) -> list[str] | None:
    ref = record.get("ReferencedFileID")
    if not ref:
        return None
    if isinstance(ref, list | tuple) or type(ref).__name__ == "MultiValue":
        return [str(p) for p in ref]
    return [str(ref)]


@dataclass(frozen=True)
class _Listing:
    """What a DICOMDIR lists: each file once, as written (components), in order; or why
    the list is not used (``refusal``)."""

    files: list[tuple[str, ...]]
    refusal: str = ""


def _dicomdir_listing(path: Path, most: int) -> _Listing | None:
    """The files the DICOMDIR at ``path`` lists, or why they are not used: it is larger than
    :data:`MAX_DICOMDIR_BYTES` (not read at all), it holds more records than ``most`` files
    need (not parsed), or it lists more than ``most`` files. None when it is not a readable
    DICOMDIR. Its records are parsed one at a time: memory holds its bytes and one record."""
    too_large = _Listing([], f"the CD's index (DICOMDIR) is larger than "
                             f"{MAX_DICOMDIR_BYTES >> 20} MB (not read)")
    try:
        with open_inside(path.parent, [path.name]) as fh:
            if os.fstat(fh.fileno()).st_size > MAX_DICOMDIR_BYTES:
                return too_large
            data = fh.read(MAX_DICOMDIR_BYTES + 1)
    except Exception:  # noqa: BLE001 - an unreadable DICOMDIR: fall back to walking
        return None
    if len(data) > MAX_DICOMDIR_BYTES:  # it grew since
        return too_large
    if sum(data.count(tag) for tag in _ITEM_TAGS) > _ITEMS_PER_FILE * max(most, 0) + _FEW_ITEMS:
        return _Listing([], "the CD's index (DICOMDIR) holds more entries than the files "
                            "read in one go need (not used)")
    try:
        return _listed_files(io.BytesIO(data), most)
    except Exception:  # noqa: BLE001 - as above
        return None


def _listed_files(fh: BinaryIO, most: int) -> _Listing | None:
    """:func:`_dicomdir_listing` of the open file ``fh``."""
    head = read_partial(fh, stop_when=lambda tag, _vr, _length: tag == _RECORDS)
    if str(head.file_meta.get("MediaStorageSOPClassUID", "")) != _MEDIA_DIRECTORY:
        return None
    implicit, little = head.original_encoding
    if implicit is None or little is None:
        return None
    encoding = head.original_character_set
    # read_partial stopped at the start of the Directory Record Sequence (if there is one)
    element = struct.Struct(("<" if little else ">") + ("HHL" if implicit else "HH2s2xL"))
    start = fh.read(element.size)
    if len(start) < element.size:
        return _Listing([])  # no records
    length = element.unpack(start)[-1]
    end = None if length == 0xFFFFFFFF else fh.tell() + length
    files: list[tuple[str, ...]] = []
    seen: set[tuple[str, ...]] = set()
    while end is None or fh.tell() < end:
        record = read_sequence_item(fh, implicit, little, encoding)
        if record is None:  # the end of a sequence of undefined length
            break
        parts = _file_ids(record)
        if not parts or tuple(parts) in seen:
            continue
        if len(files) >= most:
            return _Listing([], "the CD's index (DICOMDIR) lists more files than are read "
                                "in one go (not used)")
        seen.add(tuple(parts))
        files.append(tuple(parts))
    return _Listing(files)


def _safe_member(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return (not path.is_absolute() and ".." not in path.parts and bool(path.parts)
            and ":" not in path.parts[0])


def _is_link_member(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


# The end record of a zip file as ZipFile itself reads it, to learn what the central directory
# states before ZipFile reads all of it into memory; indexes of its members and bytes.
_end_record: Callable[[BinaryIO], list[Any] | None] = (
    zipfile._EndRecData)  # type: ignore[attr-defined]
_END_MEMBERS, _END_DIRECTORY_BYTES = 4, 5


def _directory_refusal(members: int, directory: int, limits: ZipLimits) -> str:
    """Why a zip file whose end record states ``members`` members in a central directory of
    ``directory`` bytes is not opened (opening it reads all of that directory); "" when it
    may be."""
    if members > limits.max_members:
        return f"the zip file holds more than {limits.max_members} files"
    if directory > max(members, 1) * _CENTRAL_ENTRY_BYTES:
        return ("the zip file is damaged or built to mislead (its list of files is far "
                "larger than its files need)")
    return ""


def over_budget(budget: int) -> str:
    """Why an item was not read: the walk's budget of ``budget`` items was spent."""
    return (f"not read: at most {budget} files are read in one go, counting the files in zip "
            "files and those a CD's index (DICOMDIR) lists; nothing from here on was read")


class DicomInputs:
    """Walks files, folders, zip files and DICOMDIR media, yielding every file they hold.

    Nothing outside the media is opened: DICOMDIR references and zip members are checked
    before use, symbolic links inside folders and media are not followed (paths named on the
    command line are the operator's and are taken as given), and only regular files are read.
    Refusals name the entry as the media writes it, never what it points at. At most
    ``max_items`` items are read (see the module's documentation); what staff import on the
    server (``imageshare import``) has no such budget.
    """

    def __init__(self, zip_limits: ZipLimits | None = None,
                 expanded_limit: int | None = None, limit_text: str = "the limit",
                 max_items: int | None = None) -> None:
        """``zip_limits`` apply to every zip file met; ``expanded_limit`` (when given) caps
        the bytes all zip members of the walk expand to together, named in refusals as
        ``limit_text`` (e.g. "this upload's limit of 100 MB"); ``max_items`` is the walk's
        budget of items (None: none)."""
        self._open_zips: list[zipfile.ZipFile] = []
        self._open_files: list[BinaryIO] = []
        self._zip_limits = zip_limits or ZipLimits()
        self._allowance = _Allowance(expanded_limit, limit_text)
        self._budget = sys.maxsize if max_items is None else max_items
        self._left = self._budget
        self._spent_all = False
        self._names: FolderNames = {}

    def close(self) -> None:
        """Close the zip files opened while walking."""
        while self._open_zips:
            self._open_zips.pop().close()
        while self._open_files:
            self._open_files.pop().close()

    def bytes_left(self) -> int | None:
        """Bytes of the walk's allowance (``expanded_limit``) not yet taken; None: no limit."""
        left = self._allowance.left
        return None if left is None else max(left, 0)

    def claim_bytes(self, count: int) -> bool:
        """Take ``count`` bytes from the walk's allowance for what a file grew to when it was
        converted; False, taking nothing, when they are not left (safe from any thread)."""
        return self._allowance.claim(count)

    def _spend(self, count: int, label: str, report: ImportReport) -> bool:
        """Take ``count`` items from the budget; when they are not left, record ``label`` as
        not read, end the walk and return False."""
        if self._spent_all or count > self._left:
            if not self._spent_all:
                report.refused.append((label, over_budget(self._budget)))
            self._spent_all = True
            return False
        self._left -= count
        return True

    def candidates(self, inputs: list[Path], report: ImportReport) -> Iterator[Candidate]:
        """Every file the inputs hold, zip members and DICOMDIR references included (when
        the budget is spent, each input not reached is recorded as not read).

        A CD's contents given item by item (its DICOMDIR beside its folders: the files of a
        disc selected and dropped, or ``/media/cdrom/*``) are read as the media they are:
        the DICOMDIR first, through its references, and the folders beside it not walked
        again (their other files are the disc's viewer program, its icons and manuals, not
        the patient's images); files beside it are still read."""
        inputs = sorted(inputs, key=lambda p: p.name.upper() != "DICOMDIR")  # stable
        # folders whose DICOMDIR was read, with the files it listed (by device and inode)
        media_roots: dict[Path, set[tuple[int, int]]] = {}
        walked_whole: set[Path] = set()  # folders read file by file already
        for index, item in enumerate(inputs):
            if self._spent_all:
                report.refused.extend((str(rest), over_budget(self._budget))
                                      for rest in inputs[index:])
                return
            if item.parent in walked_whole:
                continue
            if item.parent in media_roots and item.is_dir() and not item.is_symlink():
                yield from self._walk(item, report, leave_out=None,
                                      seen=media_roots[item.parent], on_media=True)
            elif item.is_dir():
                yield from self._folder(item, report)
            elif item.is_file():
                if not self._spend(1, str(item), report):
                    continue
                listing = (_dicomdir_listing(item, self._left)
                           if item.name.upper() == "DICOMDIR" else None)
                if listing is not None:
                    seen: set[tuple[int, int]] = set()
                    if listing.refusal:
                        walked_whole.add(item.parent)
                    else:
                        media_roots[item.parent] = seen
                    yield from self._media(item.parent, item, listing, report, seen)
                    continue
                try:
                    with open(item, "rb") as fh:
                        is_zip = zipfile.is_zipfile(fh)
                except OSError as exc:
                    report.refused.append((str(item), f"cannot read ({exc.strerror or exc})"))
                    continue
                if is_zip:
                    yield from self._zip(str(item), _file_opener(item), report)
                else:
                    yield Candidate(str(item), _file_opener(item), explicit=True)
            else:
                report.refused.append((str(item), "no such file or folder"))

    def _folder(self, folder: Path, report: ImportReport) -> Iterator[Candidate]:
        try:
            entries = sorted(folder.iterdir())
        except OSError as exc:  # a disc that cannot be read: named, the other inputs go on
            report.refused.append((str(folder), f"cannot read this folder "
                                   f"({exc.strerror or type(exc).__name__}); nothing in it "
                                   "was read"))
            return
        dicomdir = next(
            (p for p in entries
             if p.name.upper() == "DICOMDIR" and not p.is_symlink() and p.is_file()), None
        )
        if dicomdir is not None:
            if not self._spend(1, str(dicomdir), report):
                return
            listing = _dicomdir_listing(dicomdir, self._left)
            if listing is not None:
                yield from self._media(folder, dicomdir, listing, report)
                return
            # not a DICOMDIR that can be read: a file like the others
            yield from self._media_file(folder, [dicomdir.name], str(dicomdir), report,
                                        listed=False)
        yield from self._walk(folder, report, leave_out=dicomdir)

    def _media(self, folder: Path, dicomdir: Path, listing: _Listing, report: ImportReport,
               seen: set[tuple[int, int]] | None = None) -> Iterator[Candidate]:
        """The files of media whose DICOMDIR is ``dicomdir``: those it lists, each once (each
        added to ``seen``, when given); or, when the listing is not used, every file in the
        folder."""
        if listing.refusal:
            report.refused.append(
                (str(dicomdir), f"{listing.refusal}; its folder was read file by file instead"))
            yield from self._walk(folder, report, leave_out=dicomdir)
            return
        seen = set() if seen is None else seen
        for parts in listing.files:
            label = f"{dicomdir}: {_ID_SEPARATOR.join(parts)}"  # as written
            if not self._spend(1, label, report):
                return
            yield from self._media_file(folder, list(parts), label, report, seen=seen)

    def _walk(self, folder: Path, report: ImportReport, leave_out: Path | None,
              seen: set[tuple[int, int]] | None = None,
              on_media: bool = False) -> Iterator[Candidate]:
        """Every file under ``folder`` but ``leave_out`` (counted already) and those of
        ``seen`` (listed by a DICOMDIR, read already); a folder that cannot be read (a
        damaged disc) is named in the report, and the rest is read. ``on_media``: the
        folder is part of a CD whose DICOMDIR was read (see :class:`Candidate`)."""

        def unreadable(exc: OSError) -> None:
            why = exc.strerror or type(exc).__name__
            report.refused.append((str(exc.filename or folder), f"cannot read this folder "
                                   f"({why}); the files in it were not read"))

        for root, dirs, files in os.walk(folder, onerror=unreadable):  # links: not entered
            for name in [d for d in dirs if (Path(root) / d).is_symlink()]:
                if not self._spend(1, str(Path(root) / name), report):
                    return
                report.refused.append((str(Path(root) / name), "a symbolic link (not followed)"))
                dirs.remove(name)
            dirs.sort()
            relative = Path(root).relative_to(folder).parts
            for name in sorted(files):
                path = Path(root) / name
                if path == leave_out:
                    continue
                if not self._spend(1, str(path), report):
                    return
                yield from self._media_file(folder, [*relative, name], str(path), report,
                                            listed=False, seen=seen, on_media=on_media)

    def _media_file(self, root: Path, parts: list[str], label: str, report: ImportReport,
                    listed: bool = True, seen: set[tuple[int, int]] | None = None,
                    on_media: bool = False) -> Iterator[Candidate]:
        """The file at ``parts`` under ``root`` (a zip file's members, if it is one); none
        when it is one of ``seen`` (a file listed before under another spelling)."""
        try:
            with open_inside(root, parts, self._names) as fh:
                if seen is not None:
                    facts = os.fstat(fh.fileno())
                    if (facts.st_dev, facts.st_ino) in seen:
                        if listed:
                            report.repeated += 1
                        return
                    seen.add((facts.st_dev, facts.st_ino))
                is_zip = zipfile.is_zipfile(fh)
        except OutsideTheMedia as exc:
            report.refused.append((label, str(exc)))
            return
        except FileNotFoundError:
            report.refused.append((label, "listed in DICOMDIR but missing" if listed
                                   else "no such file"))
            return
        except OSError as exc:
            report.refused.append((label, f"cannot read ({exc.strerror or type(exc).__name__})"))
            return

        def opener(r: Path = root, p: tuple[str, ...] = tuple(parts)) -> BinaryIO:
            return open_inside(r, p, self._names)

        if is_zip and not listed:
            yield from self._zip(label, opener, report, on_media)
        else:
            yield Candidate(label, opener, explicit=listed, on_media=on_media)

    def _zip(self, label_base: str, opener: Callable[[], BinaryIO], report: ImportReport,
             on_media: bool = False) -> Iterator[Candidate]:
        """The members of a zip file, once it passed the zip limits and fits in what is left
        of the budget (else its refusal; when it does not fit, the walk ends)."""
        try:
            fh = opener()
        except (OSError, OutsideTheMedia) as exc:
            report.refused.append(
                (label_base, f"unreadable zip file ({exc.__class__.__name__})"))
            return
        archive = None
        try:
            size = fh.seek(0, os.SEEK_END)
            end = _end_record(fh)
            if end is None:
                raise zipfile.BadZipFile("no end record")
            reason = _directory_refusal(int(end[_END_MEMBERS]),
                                        int(end[_END_DIRECTORY_BYTES]), self._zip_limits)
            if not reason:
                archive = zipfile.ZipFile(fh)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            fh.close()
            report.refused.append(
                (label_base, f"unreadable zip file ({exc.__class__.__name__})"))
            return
        infos = archive.infolist() if archive is not None else []
        if archive is not None:
            reason = zip_refusal(archive, size, self._zip_limits, self._allowance.left,
                                 self._allowance.text)
        files = sum(1 for info in infos if not info.is_dir())
        # (a refused zip file costs the one item it was; its members count once let in)
        if reason or archive is None or not self._spend(files, label_base, report):
            if archive is not None:
                archive.close()
            fh.close()
            if reason:
                report.refused.append((label_base, reason))
            return  # else _spend recorded why (the budget) and ended the walk
        self._allowance.take(sum(info.file_size for info in infos))
        # members are read by other threads; close() closes them
        self._open_zips.append(archive)
        self._open_files.append(fh)
        for info in infos:
            label = f"{label_base}!{info.filename}"
            if info.is_dir():
                continue
            if not _safe_member(info.filename):
                report.refused.append((label, "unsafe path in zip file (refused)"))
                continue
            if _is_link_member(info):
                report.refused.append((label, "a symbolic link in the zip file (not followed)"))
                continue
            if info.flag_bits & 0x1:
                report.refused.append((label, "encrypted zip member"))
                continue
            if PurePosixPath(info.filename).name.upper() == "DICOMDIR":
                report.skipped += 1
                continue
            yield Candidate(label, _member_opener(archive, info, self._allowance),
                            on_media=on_media)


class Importer(DicomInputs):
    """Walks inputs and feeds every DICOM file to the ingest pipeline."""

    def __init__(self, ingest: IngestService, max_items: int | None = None) -> None:
        super().__init__(max_items=max_items)
        self.ingest = ingest

    def run(
        self, inputs: list[Path], actor: Actor,
        progress: Callable[[str], None] | None = None, parallel: int = 4,
    ) -> ImportReport:
        """Import everything under ``inputs``; never stops on one bad file.

        ``parallel`` files are stored at once (their index writes share commits).
        """
        report = ImportReport()
        lock = threading.Lock()

        def one(candidate: Candidate) -> None:
            outcome = self._one(candidate, actor)
            with lock:
                outcome(report)
                if progress:
                    progress(candidate.label)

        walk = self.candidates(inputs, report)
        try:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                window: list[Future[None]] = []
                while True:
                    with lock:  # the walk records refusals in the report too
                        candidate = next(walk, None)
                    if candidate is None:
                        break
                    window.append(pool.submit(one, candidate))
                    if len(window) >= 4 * parallel:  # bounded: memory stays flat
                        window.pop(0).result()
                for future in window:
                    future.result()
        finally:
            self.close()
        return report

    def _one(self, candidate: Candidate, actor: Actor) -> Callable[[ImportReport], None]:
        """Store one file; returns how to count it in the report."""
        try:
            return self._store(candidate, actor)
        except Exception as exc:  # noqa: BLE001 - one bad file never stops an import
            reason = f"unexpected error ({type(exc).__name__})"
            return lambda report: report.refused.append((candidate.label, reason))

    def _store(self, candidate: Candidate, actor: Actor) -> Callable[[ImportReport], None]:
        label = candidate.label

        def refuse(reason: str) -> Callable[[ImportReport], None]:
            return lambda report: report.refused.append((label, reason))

        def skip(report: ImportReport) -> None:
            report.skipped += 1

        try:
            with candidate.open() as stream:
                if not _is_part10(stream):
                    if candidate.explicit:
                        return refuse("not a DICOM Part 10 file (no 'DICM' prefix)")
                    return skip
            with candidate.open() as stream:
                header_check = dcmread(stream, stop_before_pixels=True,
                                       specific_tags=["SOPClassUID"])
            if str(header_check.get("SOPClassUID", "")) == _MEDIA_DIRECTORY:
                return skip
        except Exception:  # noqa: BLE001 - the pipeline gives the precise reason below
            pass
        try:
            with candidate.open() as stream:
                result = self.ingest.store_stream(stream, actor)
        except (InvalidInstance, ConflictingInstance) as exc:
            return refuse(str(exc))
        except OSError as exc:
            return refuse(f"cannot read ({exc.strerror or exc})")

        def count(report: ImportReport) -> None:
            report.studies.add(result.study_uid)
            if result.outcome == "stored":
                report.stored += 1
            elif result.outcome == "held":
                report.held += 1
            elif result.outcome == "duplicate":
                report.duplicates += 1
            elif result.outcome == "kept_first":
                report.kept_first += 1
            else:
                report.replaced += 1

        return count
