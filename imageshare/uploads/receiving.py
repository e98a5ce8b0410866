"""Receiving the files of an upload, resumably: the state behind the tus 1.0 protocol (core,
creation, termination) that the web layer speaks.

Each file is announced with its length and its path inside what was dropped (a folder's
relative path, or just its name); the bytes arrive in chunks at the offset received so far
and are written straight to a file on disk (never whole in memory), so that a dropped
connection resumes where it stopped. A file complete is moved into the round's folder at its
path (checked: no absolute paths, no ``..``, no empty or hidden tricks), where the intake
(:mod:`imageshare.uploads.intake`) finds a CD's folder with its DICOMDIR as it was.
"""

from __future__ import annotations

import os
import secrets
import shutil
import unicodedata
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, case, func, insert, or_, select, update

from imageshare.audit.trail import AuditTrail
from imageshare.domain.errors import (
    ImageShareError,
    NotFound,
    UploadOffsetMismatch,
    UploadQuotaExceeded,
)
from imageshare.storage.index.database import take_write_lock
from imageshare.storage.index.schema import (
    instances,
    upload_files,
    upload_invitations,
    upload_results,
)
from imageshare.uploads.invitations import Invitation

MAX_PATH_PARTS = 16
MAX_FILES = 20_000


@dataclass(frozen=True)
class UploadFile:
    """One announced file and how much of it arrived."""

    upload_id: str
    path: str
    length: int
    offset: int
    status: str
    round: int
    sop_uid: str = ""
    outcome: str = ""


def _refuse_file_and_folder_of_one_name(conn: Connection, invitation: Invitation, round_: int,
                                        parts: list[str]) -> None:
    """Raises ImageShareError when the round holds a file where ``parts`` has a folder, or
    a folder (a file inside it) where ``parts`` ends: the two could not both be kept."""
    relative = "/".join(parts)
    folders = ["/".join(parts[:i]) for i in range(1, len(parts))]
    clash = conn.execute(select(upload_files.c.path).where(
        upload_files.c.invitation_pk == invitation.pk, upload_files.c.round == round_,
        upload_files.c.status != "removed",
        or_(upload_files.c.path.in_(folders),
            upload_files.c.path.startswith(relative + "/", autoescape=True))).limit(1)).scalar()
    if clash is not None:
        raise ImageShareError("a file and a folder of this upload have the same name "
                              f"({str(clash)}): rename one of them and add it again")


def _from_row(row: Any) -> UploadFile:
    return UploadFile(row["upload_id"], row["path"], row["length"], row["offset"],
                      row["status"], row["round"], row["sop_uid"], row["outcome"])


# What no real file name holds: control characters (Cc: a line break, an escape), line and
# paragraph separators (Zl, Zp) and invisible format characters (Cf: text-direction marks,
# embeddings, overrides and isolates, which show a name in another order than it is written,
# zero-width spaces, byte order marks). The zero-width (non-)joiners are written in Persian
# and Indic words and in emoji, and are allowed.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_JOINERS = frozenset("\u200c\u200d")


def _hidden_characters(part: str) -> bool:
    """True when ``part`` holds a character of :data:`_REFUSED_CATEGORIES` (joiners aside)."""
    return any(unicodedata.category(c) in _REFUSED_CATEGORIES and c not in _JOINERS
               for c in part)


def safe_parts(path: str) -> list[str]:
    """The components of a path given by a browser (a folder's relative path or a file's
    name), checked to stay inside the upload; ImageShareError otherwise."""
    parts = [p for p in path.replace("\\", "/").split("/")]
    if not path or len(path) > 1024 or len(parts) > MAX_PATH_PARTS:
        raise ImageShareError("the file's name or folder path is too long")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(part.encode()) > 255 or (
                part.startswith(".") and part.strip(".") == ""):
            raise ImageShareError("the file's path is not allowed (it would leave the upload)")
        if _hidden_characters(part):
            # Shown to the staff who review the upload and written into the DICOM made of
            # it: a line break, an escape (a DICOM character set switch) or a right-to-left
            # override ("photo<RLO>gpj.exe" reads "photoexe.jpg") is no part of a real name.
            raise ImageShareError("the file's name holds control, invisible or "
                                  "text-direction characters: rename it and send it again")
    if parts[0].endswith(":"):
        raise ImageShareError("the file's path is not allowed (a drive name)")
    return parts


@dataclass(frozen=True)
class Arrival:
    """What a complete file became on arrival: the instance and the store's outcome, and
    what it showed (its study, how its patient compares with the invitation's, modality and
    body part); all "" when it waits for the intake at Send."""

    sop_uid: str = ""
    outcome: str = ""
    study_uid: str = ""
    identity: str = ""
    modality: str = ""
    body_part: str = ""


NOT_STORED = Arrival()


# Statements run for every file announced (built once: building one costs more than running it)
_USAGE = select(  # files, bytes announced, the last round sent
    func.count(), func.coalesce(func.sum(case(
        (upload_files.c.status != "removed", upload_files.c.length), else_=0)), 0),
    func.max(case((upload_files.c.status == "done", upload_files.c.round)))).where(
    upload_files.c.invitation_pk == bindparam("pk"))
_INVITATION_LOCK = select(upload_invitations.c.pk).where(
    upload_invitations.c.pk == bindparam("pk")).with_for_update()
_UNFINISHED = update(upload_files).where(
    upload_files.c.invitation_pk == bindparam("invitation"),
    upload_files.c.path == bindparam("same_path"),
    upload_files.c.length == bindparam("same_length"),
    upload_files.c.status == "receiving").values(status="removed").returning(
    upload_files.c.upload_id)
_ANNOUNCE = insert(upload_files)
_RECEIVED = update(upload_files).where(  # a file complete, and what it was stored as
    upload_files.c.invitation_pk == bindparam("invitation"),
    upload_files.c.upload_id == bindparam("id"), upload_files.c.status == "receiving").values(
    offset=bindparam("new_offset"), status="received", completed_at=bindparam("at"),
    sop_uid=bindparam("sop"), outcome=bindparam("how"), study_uid=bindparam("study"),
    identity=bindparam("who"), modality=bindparam("kind"), body_part=bindparam("part"))


class UploadReceiver:
    """Announced files, their received bytes and where complete ones are kept."""

    def __init__(self, engine: Engine, audit: AuditTrail, root: Path) -> None:
        self._engine = engine
        self._audit = audit
        self.root = root

    def folder(self, invitation: Invitation) -> Path:
        """Where this invitation's files are kept until they are reviewed."""
        return self.root / invitation.public_id

    def round_folder(self, invitation: Invitation, round_: int) -> Path:
        """The folder of one round's complete files, at their paths."""
        return self.folder(invitation) / f"round-{round_}" / "files"

    def current_round(self, invitation: Invitation) -> int:
        """The round files go to now (a rejection opens the next one)."""
        with self._engine.connect() as conn:
            done = conn.execute(select(func.max(upload_files.c.round)).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.status == "done")).scalar()
        return int(done or 0) + 1

    def used_bytes(self, invitation: Invitation) -> int:
        """Bytes announced for the invitation so far (every round)."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(upload_files.c.length), 0))
                                    .where(upload_files.c.invitation_pk == invitation.pk,
                                           upload_files.c.status != "removed")).scalar() or 0)

    def create(self, invitation: Invitation, length: int, path: str) -> UploadFile:
        """Announce a file of ``length`` bytes at ``path``; refused past the invitation's
        size limit or file count."""
        parts = safe_parts(path)
        if length < 0:
            raise ImageShareError("Upload-Length must be a whole number of bytes")
        relative = "/".join(parts)
        upload_id = secrets.token_hex(16)
        part = self.part_path(invitation, upload_id)
        part.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        part.touch(mode=0o600)  # before its record: a recorded file always has its bytes
        try:
            with self._engine.begin() as conn:  # one transaction: the checks and the record
                # Announcements to one invitation, in any process, one at a time (else two
                # could each pass the size limit alone).
                take_write_lock(conn)
                conn.execute(_INVITATION_LOCK, {"pk": invitation.pk})
                stale = self._drop_restarted(conn, invitation, relative, length)
                count, used, done_round = conn.execute(_USAGE, {"pk": invitation.pk}).one()
                if count >= MAX_FILES:
                    raise UploadQuotaExceeded(f"an upload holds at most {MAX_FILES} files")
                used = int(used or 0)
                if used + length > invitation.max_bytes:
                    raise UploadQuotaExceeded(
                        f"this upload is limited to {invitation.max_bytes >> 20} MB in all; "
                        f"{max(0, invitation.max_bytes - used) >> 20} MB are left")
                round_ = int(done_round or 0) + 1  # as current_round()
                _refuse_file_and_folder_of_one_name(conn, invitation, round_, parts)
                conn.execute(_ANNOUNCE, {
                    "invitation_pk": invitation.pk, "upload_id": upload_id, "round": round_,
                    "path": relative, "length": length, "offset": 0, "status": "receiving",
                    "created_at": datetime.now(UTC)})
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        for dropped in stale:
            self.part_path(invitation, dropped).unlink(missing_ok=True)
        return UploadFile(upload_id, relative, length, 0, "receiving", round_)

    @staticmethod
    def _drop_restarted(conn: Connection, invitation: Invitation, path: str,
                        length: int) -> list[str]:
        """A file announced again (the page sends it from its start after a connection was
        lost during its announcement): the unfinished earlier announcements of the same path
        and length are dropped, so that they do not count against the size limit. Returns
        their ids (their bytes are removed once this is committed)."""
        return list(conn.execute(_UNFINISHED, {
            "invitation": invitation.pk, "same_path": path, "same_length": length}).scalars())

    def file(self, invitation: Invitation, upload_id: str) -> UploadFile:
        """One of the invitation's files; NotFound for anyone else's."""
        with self._engine.connect() as conn:
            row = conn.execute(select(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.upload_id == upload_id,
                upload_files.c.status != "removed")).mappings().first()
        if row is None:
            raise NotFound("no such upload")
        return _from_row(row)

    def files(self, invitation: Invitation, round_: int | None = None) -> list[UploadFile]:
        """The invitation's files (of one round), in the order they were announced."""
        stmt = select(upload_files).where(upload_files.c.invitation_pk == invitation.pk,
                                          upload_files.c.status != "removed")
        if round_ is not None:
            stmt = stmt.where(upload_files.c.round == round_)
        with self._engine.connect() as conn:
            rows = conn.execute(stmt.order_by(upload_files.c.pk)).mappings().all()
        return [_from_row(r) for r in rows]

    def part_path(self, invitation: Invitation, upload_id: str) -> Path:
        """Where a file's bytes are received."""
        return self.folder(invitation) / "parts" / upload_id

    def received_bytes(self, invitation: Invitation, upload_id: str) -> int:
        """How much of a file being received is on this instance's disk; NotFound when its
        bytes are kept by another instance (the sender starts the file again)."""
        try:
            return self.part_path(invitation, upload_id).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound("this file's upload continues on another server; send it "
                           "again") from exc

    def begin_append(self, invitation: Invitation, upload_id: str, offset: int,
                     found: UploadFile | None = None) -> UploadFile:
        """Check that a chunk may be written at ``offset`` (tus: the offset received so far);
        ``found``: the file as just created (not looked up again)."""
        found = found or self.file(invitation, upload_id)
        if found.status != "receiving":
            raise UploadOffsetMismatch("this file was received completely already")
        on_disk = self.received_bytes(invitation, upload_id)
        if on_disk != found.offset:  # bytes written after the last recorded offset: resync
            found = self._record_offset(invitation, found, min(on_disk, found.length))
        if offset != found.offset:
            raise UploadOffsetMismatch(
                f"the upload continues at byte {found.offset}, not at {offset}")
        return found

    def _record_offset(self, invitation: Invitation, found: UploadFile,
                       offset: int) -> UploadFile:
        with self._engine.begin() as conn:
            conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.upload_id == found.upload_id).values(offset=offset))
        return UploadFile(found.upload_id, found.path, found.length, offset, found.status,
                          found.round, found.sop_uid, found.outcome)

    def end_append(self, invitation: Invitation, found: UploadFile, offset: int,
                   arrived: Callable[[Path], Arrival] | None = None) -> UploadFile:
        """Record the bytes of ``found`` (as :meth:`begin_append` gave it) received up to
        ``offset``; a complete file is fsynced and moved to its path in the round's folder,
        and ``arrived`` (given that path) may store it at once, returning the instance it
        became and the store's outcome."""
        upload_id = found.upload_id
        part = self.part_path(invitation, upload_id)
        if offset < found.length:
            return self._record_offset(invitation, found, offset)
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self._named(invitation, found)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:  # a link fails where a file of that name is, even one placed a moment ago
            os.link(part, target)
        except FileExistsError:  # the same name twice: both kept, this one under its id
            target = self._named(invitation, found, own=True)
            os.replace(part, target)
        else:
            os.unlink(part)
        made = arrived(target) if arrived is not None else NOT_STORED
        sop_uid, outcome = made.sop_uid, made.outcome
        with self._engine.begin() as conn:
            changed = conn.execute(_RECEIVED, {
                "invitation": invitation.pk, "id": upload_id, "new_offset": offset,
                "at": datetime.now(UTC), "sop": sop_uid, "how": outcome,
                "study": made.study_uid, "who": made.identity, "kind": made.modality[:16],
                "part": made.body_part[:64]}).rowcount
        if not changed:  # withdrawn (or its round sent) while its last bytes were stored
            target.unlink(missing_ok=True)
            return UploadFile(found.upload_id, found.path, found.length, offset, "removed",
                              found.round, sop_uid, outcome)
        return UploadFile(found.upload_id, found.path, found.length, offset, "received",
                          found.round, sop_uid, outcome)

    def unsent(self, invitation: Invitation, upload_id: str) -> UploadFile:
        """A file that may still be withdrawn (not sent yet); ImageShareError otherwise."""
        found = self.file(invitation, upload_id)
        if found.status == "done":
            raise ImageShareError("this file was sent to the hospital already")
        return found

    def withdraw(self, invitation: Invitation, found: UploadFile) -> None:
        """Mark a file not yet sent as withdrawn (tus termination), at once for everyone (a
        Send from now on leaves it out); refused when it was sent meanwhile. Its bytes stay
        until :meth:`drop_bytes` (:meth:`restore` undoes the withdrawal)."""
        with self._engine.begin() as conn:
            changed = conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.upload_id == found.upload_id,
                upload_files.c.status.in_(["receiving", "received"])).values(
                status="removed")).rowcount
        if not changed:
            raise ImageShareError("this file was sent to the hospital already")

    def restore(self, invitation: Invitation, found: UploadFile) -> None:
        """Undo :meth:`withdraw` (what it was stored as could not be removed)."""
        with self._engine.begin() as conn:
            conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.upload_id == found.upload_id,
                upload_files.c.status == "removed").values(status=found.status))

    def terminate(self, invitation: Invitation, found: UploadFile) -> None:
        """Forget a file not yet sent for review, with its bytes; refused when it was sent
        (or withdrawn) meanwhile."""
        self.withdraw(invitation, found)
        self.drop_bytes(invitation, found)

    def _named(self, invitation: Invitation, found: UploadFile, own: bool = False) -> Path:
        """Where a complete file lies in its round's folder: at its path, or (``own``: when
        another file of that name was there first) beside it under a name with its id."""
        target = self.round_folder(invitation, found.round).joinpath(*found.path.split("/"))
        if own:
            target = target.with_name(f"{target.stem}-{found.upload_id[:6]}{target.suffix}")
        return target

    def drop_bytes(self, invitation: Invitation, found: UploadFile) -> None:
        """Remove a withdrawn file's bytes (not those of another file of the same name)."""
        self.part_path(invitation, found.upload_id).unlink(missing_ok=True)
        if found.status == "received":
            own = self._named(invitation, found, own=True)
            (own if own.exists() else self._named(invitation, found)).unlink(missing_ok=True)

    def referenced(self, sop_uids: set[str], besides: Collection[str] = ()) -> set[str]:
        """Those of ``sop_uids`` that a file of any upload (received, or sent and reported)
        other than the files ``besides`` (upload ids) still refers to."""
        if not sop_uids:
            return set()
        wanted = sorted(sop_uids)
        with self._engine.connect() as conn:
            held = set(conn.execute(select(upload_files.c.sop_uid).where(
                upload_files.c.sop_uid.in_(wanted),
                upload_files.c.upload_id.not_in(sorted(besides)),
                upload_files.c.status != "removed")).scalars())
            held |= set(conn.execute(select(upload_results.c.sop_uid).where(
                upload_results.c.sop_uid.in_(wanted))).scalars())
        return held

    def orphans(self, before: datetime) -> set[str]:
        """Instances waiting in the ``upload`` class since before ``before`` that no upload
        refers to any more (their files withdrawn or ended unsent, on every upload that had
        them)."""
        with self._engine.connect() as conn:
            return set(conn.execute(select(instances.c.sop_uid).where(
                instances.c.retention_class == "upload", instances.c.received_at < before,
                instances.c.sop_uid.not_in(select(upload_files.c.sop_uid).where(
                    upload_files.c.status != "removed", upload_files.c.sop_uid != "")),
                instances.c.sop_uid.not_in(select(upload_results.c.sop_uid).where(
                    upload_results.c.sop_uid != "")))).scalars())

    def with_unsent_files(self) -> list[str]:
        """The invitations (public ids) holding files that were never sent."""
        with self._engine.connect() as conn:
            return list(conn.execute(select(upload_invitations.c.public_id).where(
                upload_invitations.c.pk.in_(select(upload_files.c.invitation_pk).where(
                    upload_files.c.status.in_(["receiving", "received"]))))).scalars())

    def all_unsent(self, invitation: Invitation) -> list[UploadFile]:
        """Every file of the invitation that was never sent."""
        return [f for f in self.files(invitation) if f.status in ("receiving", "received")]

    def forget_unsent(self, invitation: Invitation, unsent: list[UploadFile]) -> None:
        """Forget these files that were never sent (the invitation ended before Send), with
        their bytes."""
        if not unsent:
            return
        with self._engine.begin() as conn:
            conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk,
                upload_files.c.upload_id.in_([f.upload_id for f in unsent]),
                upload_files.c.status.in_(["receiving", "received"])).values(status="removed"))
        shutil.rmtree(self.folder(invitation) / "parts", ignore_errors=True)
        for round_ in {f.round for f in unsent}:
            self.discard_round(invitation, round_)

    def finish_round(self, invitation: Invitation, round_: int) -> int:
        """Mark the round's received files as sent (returns how many: none when another
        Send took them a moment before); unfinished ones are dropped."""
        with self._engine.begin() as conn:
            sent = conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk, upload_files.c.round == round_,
                upload_files.c.status == "received").values(status="done")).rowcount
            conn.execute(update(upload_files).where(
                upload_files.c.invitation_pk == invitation.pk, upload_files.c.round == round_,
                upload_files.c.status == "receiving").values(status="removed"))
        shutil.rmtree(self.folder(invitation) / "parts", ignore_errors=True)
        return int(sent)

    def discard_round(self, invitation: Invitation, round_: int) -> None:
        """Remove a round's files from disk (after intake; originals are kept elsewhere)."""
        shutil.rmtree(self.folder(invitation) / f"round-{round_}", ignore_errors=True)
