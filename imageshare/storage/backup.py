"""Backup, restore and scrub: a consistent copy of the index and the blobs while the server
runs, an installation rebuilt from it, and every blob checked against its recorded digest.

A backup folder holds the blobs once (``blobs/``, laid out like the file store, each copied
at most once over all snapshots: later backups are incremental) and one folder per snapshot
(``snapshots/<UTC time>/``) with the index (``index.sqlite`` from SQLite's online backup API,
or ``index.pgdump`` from ``pg_dump`` in custom format on the same MVCC snapshot as the blob
list), the list of the snapshot's blobs with their sizes and SHA-256 digests (``blobs.jsonl``),
and ``manifest.json`` naming both files with their own digests. ``LATEST`` names the newest
snapshot. The installation key (``secret_key`` / ``secret_key_file``) is never in a backup:
keep it apart; a restore needs it for sealed secrets (second factors, site credentials).

Given the installation key (``manifest_key``), a backup signs its manifest with an HMAC-SHA256
under a key derived from it (a label of its own), and a restore given the key refuses a
manifest that is unsigned or not signed with it (nor, after a key rotation, with one of the
retired keys it is given: a backup made before the rotation is signed with the old key):
the manifest's digests then bind the index,
the blob lists (each blob's digest) and the audit heads to the installation that wrote them,
so that someone who can write the backup cannot slip in another index or blob and rewrite
the digests. A backup refuses to start when the destination has too little free space for
the index and the blobs it would copy; a restore writes the blobs first and the index last,
so that a restore that stops half-way leaves no index naming blobs that are not there (and
can be run again).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, inspect, select, text, update
from sqlalchemy.engine import make_url

from imageshare.domain.errors import (
    ConfigurationError,
    ImageShareError,
    OutOfResources,
    StorageError,
)
from imageshare.storage.blobs import CHUNK, BlobStore, check_key
from imageshare.storage.encrypted import MAGIC, EncryptedBlobStore, plain_size, sealed_size
from imageshare.storage.index.schema import instances

FORMAT = "imageshare-backup-1"
# The only file names a manifest may give for its parts: a restore reads these files, so a
# manifest naming another (checked) file would leave the one restored unchecked.
INDEX_FILES = {"sqlite": "index.sqlite", "postgresql": "index.pgdump"}
LISTING_FILES = {"blobs": "blobs.jsonl", "originals": "originals.jsonl"}
SIGNATURE = "signature"
# Free space a backup leaves on its destination beyond what it computes it needs.
SPARE_BYTES = 16 * 1024 * 1024
Progress = Callable[[int], None]
# The audit chain's check of an index (what it finds wrong; nothing when intact): given by
# the caller, the audit trail being a layer above storage.
TrailCheck = Callable[[Engine], list[str]]


def _noop(_n: int) -> None:
    return None


@dataclass(frozen=True)
class BlobEntry:
    """One blob of a snapshot."""

    key: str
    size: int
    sha256: str | None


@dataclass
class BackupReport:
    """What a backup wrote."""

    snapshot: Path
    database: str
    blobs: int = 0
    copied: int = 0
    reused: int = 0
    bytes_copied: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when every blob of the snapshot is in the backup with its recorded digest."""
        return not self.missing and not self.corrupt


@dataclass
class ScrubReport:
    """What a scrub of the blob store found."""

    checked: int = 0
    bytes_read: int = 0
    recorded: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (sop_uid, key)
    missing: list[tuple[str, str]] = field(default_factory=list)
    wrong_size: list[tuple[str, str]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        """True when every blob was found with its recorded digest and size."""
        return not (self.corrupt or self.missing or self.wrong_size)


def _blob_path(root: Path, key: str) -> Path:
    check_key(key)
    return root / key[:4] / key[4:8] / key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def manifest_signing_key(installation_key: bytes) -> bytes:
    """The HMAC key backup manifests are signed with, derived from the installation key (a
    label of its own: never the key of the audit heads, the blobs or the sealed secrets)."""
    return hashlib.sha256(b"imageshare backup manifest\0" + installation_key).digest()


def _manifest_mac(installation_key: bytes, manifest: dict[str, Any]) -> str:
    """The HMAC-SHA256 (hex) of the manifest without its signature, in canonical JSON."""
    unsigned = {name: value for name, value in manifest.items() if name != SIGNATURE}
    canonical = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(manifest_signing_key(installation_key), canonical,
                    hashlib.sha256).hexdigest()


def _check_free_space(dest: Path, needed: int, what: str) -> None:
    """Refuse (:class:`OutOfResources`) before any work when ``dest`` has too little free
    space for ``needed`` bytes plus :data:`SPARE_BYTES`."""
    free = shutil.disk_usage(dest).free
    if needed + SPARE_BYTES > free:
        raise OutOfResources(f"the backup destination {dest} has {free} bytes free and "
                             f"{what} need about {needed + SPARE_BYTES}: nothing was copied; "
                             "free space or choose another destination")


def _index_bytes(engine: Engine) -> int:
    """About how many bytes the copy of the index takes (SQLite: its files; PostgreSQL: not
    known before the dump, which is compressed)."""
    if engine.dialect.name != "sqlite" or not engine.url.database:
        return 0
    return sum(Path(engine.url.database + suffix).stat().st_size
               for suffix in ("", "-wal") if Path(engine.url.database + suffix).exists())


def _bytes_to_copy(blobs: BlobStore, entries: list[BlobEntry], root: Path,
                   known: dict[str, str]) -> int:
    """Bytes the copies of ``entries`` not yet in the backup take (as stored: sealed blobs
    are longer); blobs of unrecorded size count nothing."""
    sealed = isinstance(blobs, EncryptedBlobStore)
    total = 0
    for entry in entries:
        if entry.size < 0 or (entry.key in known and _blob_path(root, entry.key).exists()):
            continue
        total += sealed_size(entry.size) if sealed else entry.size
    return total


# -- PostgreSQL tools ----------------------------------------------------------------------------

def pg_tool(name: str, bin_dir: str = "") -> str:
    """The path of ``pg_dump`` / ``pg_restore``: in ``bin_dir``, else on PATH, else the newest
    Debian PostgreSQL's."""
    if bin_dir:
        candidate = Path(bin_dir) / name
        if candidate.exists():
            return str(candidate)
        raise ConfigurationError(f"{name} is not in pg_bin_dir {bin_dir}")
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                      key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if versions:
        return str(versions[-1])
    found = shutil.which(name)
    if found:
        return found
    raise ConfigurationError(f"{name} is needed for a PostgreSQL index (Debian package "
                             "postgresql-client) or set pg_bin_dir")


def _libpq(url: str) -> tuple[list[str], dict[str, str]]:
    """Connection options for the PostgreSQL command-line tools (the password in the
    environment, never on the command line)."""
    parsed = make_url(url)
    args = ["--host", parsed.host or "127.0.0.1", "--port", str(parsed.port or 5432),
            "--username", parsed.username or "postgres", "--dbname", parsed.database or ""]
    env = {**os.environ}
    if parsed.password:
        env["PGPASSWORD"] = str(parsed.password)
    return args, env


# -- backup --------------------------------------------------------------------------------------

# Blobs of the index besides the instances' own, in the same store: the files attached to
# teaching cases, and the original content of corrected studies kept for a legal hold (their
# size is what was kept, which the copy tells; no digest is recorded).
_ATTACHMENTS_SQL = ("SELECT blob_key, -1 AS size, NULL AS sha256 FROM case_attachments "
                    "ORDER BY pk")
_KEPT_SQL = ("SELECT blob_key, -1 AS size, NULL AS sha256 FROM blob_tombstones WHERE kept "
             "ORDER BY blob_key")
# The files patients and partners uploaded as they came (photos, videos, PDFs made DICOM),
# kept in the originals store beside the blob store.
_ORIGINALS_SQL = ("SELECT original_key, -1 AS size, original_sha256 FROM upload_results "
                  "WHERE original_key <> '' ORDER BY pk")


@dataclass
class _Snapshot:
    """The index copied, and what it lists: the blobs, the kept originals of uploads, and
    the audit chain's head."""

    index_file: Path
    blobs: list[BlobEntry]
    originals: list[BlobEntry]
    head_seq: int


def _listed(rows: Any) -> list[BlobEntry]:
    return [BlobEntry(k, s, d or None) for k, s, d in rows]

_HEAD_SQL = "SELECT seq FROM audit_chain_head"


def _snapshot_sqlite(engine: Engine, folder: Path) -> _Snapshot:
    source_path = engine.url.database
    if not source_path:
        raise ConfigurationError("an in-memory SQLite index cannot be backed up")
    target = folder / "index.sqlite"
    source = sqlite3.connect(source_path, timeout=60)
    try:
        copy = sqlite3.connect(target)
        try:
            # One step: the whole database under one read transaction, a consistent snapshot
            # that writers (WAL mode) are not held up by.
            source.backup(copy)
            copy.execute("PRAGMA journal_mode=DELETE")
            rows = copy.execute("SELECT blob_key, size, sha256 FROM instances ORDER BY pk"
                                ).fetchall()
            rows += copy.execute(_ATTACHMENTS_SQL).fetchall()
            rows += copy.execute(_KEPT_SQL).fetchall()
            originals = copy.execute(_ORIGINALS_SQL).fetchall()
            head = copy.execute(_HEAD_SQL).fetchone()
        finally:
            copy.close()
    finally:
        source.close()
    with open(target, "rb+") as fh:
        os.fsync(fh.fileno())
    return _Snapshot(target, _listed(rows), _listed(originals), head[0] if head else 0)


def _snapshot_postgres(engine: Engine, folder: Path, bin_dir: str) -> _Snapshot:
    target = folder / "index.pgdump"
    args, env = _libpq(engine.url.render_as_string(hide_password=False))
    with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            # pg_dump reads the snapshot this transaction exported: index and blob list agree.
            snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar()
            rows = [*conn.execute(select(instances.c.blob_key, instances.c.size,
                                         instances.c.sha256).order_by(instances.c.pk)),
                    *conn.execute(text(_ATTACHMENTS_SQL)), *conn.execute(text(_KEPT_SQL))]
            originals = list(conn.execute(text(_ORIGINALS_SQL)))
            head = conn.execute(text(_HEAD_SQL)).scalar() or 0
            done = subprocess.run(
                [pg_tool("pg_dump", bin_dir), *args, "--format=custom", "--no-owner",
                 "--no-privileges", f"--snapshot={snapshot}", f"--file={target}"],
                env=env, capture_output=True, text=True, timeout=24 * 3600)
    if done.returncode != 0:
        raise StorageError(f"pg_dump failed: {done.stderr.strip()[-500:]}")
    with open(target, "rb+") as fh:
        os.fsync(fh.fileno())
    return _Snapshot(target, _listed(rows), _listed(originals), head)


HEADS_FILE = "audit-heads.jsonl"


def _copy_heads(heads_file: Path | None, folder: Path, head_seq: int) -> dict[str, Any] | None:
    """The signed audit chain heads up to the snapshot's head (a later one would name rows
    the snapshot does not have: after a restore, the trail would look cut short), kept with
    the snapshot; None when there is no heads file."""
    if heads_file is None or not heads_file.exists():
        return None
    kept = []
    for line in heads_file.read_text().splitlines():
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue  # a line cut by a crash: not a head
        if isinstance(seq, int) and seq <= head_seq:
            kept.append(line.strip() + "\n")
    data = "".join(kept).encode()
    _write_durably(folder / HEADS_FILE, data)
    return {"file": HEADS_FILE, "count": len(kept), "sha256": hashlib.sha256(data).hexdigest()}


def _copy_blob(blobs: BlobStore, entry: BlobEntry, target: Path) -> tuple[int, str]:
    """Copy one blob to ``target`` durably; returns its size and SHA-256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    size = 0
    # An encrypted store's blobs are copied as stored: the backup holds them encrypted.
    sealed = blobs if isinstance(blobs, EncryptedBlobStore) else None
    try:
        with (sealed.open_sealed(entry.key) if sealed else blobs.open(entry.key)) as src, \
                open(tmp, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk that filled up, a read that failed: no leftover
        raise
    if sealed:
        try:
            with open(tmp, "rb") as copied:
                plain = sealed.digest_of_stored(entry.key, copied)
        except StorageError:
            tmp.unlink(missing_ok=True)
            return -1, ""  # fails authentication: corrupt
        size, hexdigest = plain.size, plain.sha256
    else:
        hexdigest = digest.hexdigest()
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return size, hexdigest


def _is_sealed(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC


def _plain_size(path: Path) -> int:
    """Bytes of the blob a backup file holds (sealed files are longer); -1 when impossible."""
    size = path.stat().st_size
    if not _is_sealed(path):
        return size
    try:
        return plain_size(size)
    except StorageError:
        return -1


def _known_copies(catalogue: Path) -> dict[str, str]:
    """Blobs already copied to the backup and checked (``catalogue``): key -> SHA-256."""
    known: dict[str, str] = {}
    if catalogue.exists():
        for line in catalogue.read_text().splitlines():
            try:
                item = json.loads(line)
                known[item["key"]] = item["sha256"]
            except (ValueError, KeyError, TypeError):
                continue
    return known


def backup(engine: Engine, blobs: BlobStore, dest: Path, pg_bin_dir: str = "",
           progress: Progress = _noop, on_total: Progress = _noop,
           heads_file: Path | None = None, originals: BlobStore | None = None,
           manifest_key: bytes | None = None) -> BackupReport:
    """Write a consistent snapshot of the index and its blobs to ``dest`` (while the server
    runs), with the uploads' kept originals (from ``originals``) and the signed audit chain
    heads of ``heads_file`` up to the snapshot's; blobs already in ``dest`` are not copied
    again. With ``manifest_key`` (the installation key) the manifest is signed.

    Refused (:class:`OutOfResources`) before copying when ``dest`` lacks the space; a backup
    that fails leaves no snapshot folder behind (copies of blobs it made stay, for the next
    one to re-use)."""
    if engine.dialect.name not in INDEX_FILES:
        raise ConfigurationError(f"backup of a {engine.dialect.name} index is not supported")
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(dest, 0o700)
        _check_free_space(dest, _index_bytes(engine), "the copy of the index")
        name = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        folder = dest / "snapshots" / name
        folder.mkdir(parents=True, mode=0o700)
    except OSError as exc:
        raise StorageError(f"cannot write a backup to {dest} "
                           f"({exc.strerror or type(exc).__name__})") from exc
    try:
        return _backup_into(engine, blobs, dest, folder, pg_bin_dir, progress, on_total,
                            heads_file, originals, manifest_key)
    except OSError as exc:  # a full or failing disk: a reason, not a traceback
        shutil.rmtree(folder, ignore_errors=True)
        raise StorageError(f"the backup stopped ({exc.strerror or type(exc).__name__}); no "
                           "snapshot was kept") from exc
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _backup_into(engine: Engine, blobs: BlobStore, dest: Path, folder: Path, pg_bin_dir: str,
                 progress: Progress, on_total: Progress, heads_file: Path | None,
                 originals: BlobStore | None, manifest_key: bytes | None) -> BackupReport:
    """The work of :func:`backup` once the snapshot's ``folder`` is made."""
    name = folder.name
    kind = engine.dialect.name
    if kind == "sqlite":
        snap = _snapshot_sqlite(engine, folder)
    elif kind == "postgresql":
        snap = _snapshot_postgres(engine, folder, pg_bin_dir)
    else:
        raise ConfigurationError(f"backup of a {kind} index is not supported")
    kept = snap.originals if originals is not None else []
    report = BackupReport(folder, kind, blobs=len(snap.blobs) + len(kept))
    known = {part: _known_copies(dest / f"{part}.jsonl") for part in LISTING_FILES}
    needed = _bytes_to_copy(blobs, snap.blobs, dest / "blobs", known["blobs"])
    if originals is not None:
        needed += _bytes_to_copy(originals, kept, dest / "originals", known["originals"])
    _check_free_space(dest, needed, f"the {report.blobs} blob(s) of the snapshot")
    on_total(report.blobs)
    _copy_all(blobs, snap.blobs, dest, "blobs", report, progress, known["blobs"])
    if originals is not None:
        _copy_all(originals, kept, dest, "originals", report, progress, known["originals"])
    with engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    manifest = {
        "format": FORMAT, "created": name, "database": kind, "revision": revision,
        "index": {"file": snap.index_file.name, "sha256": _sha256_file(snap.index_file)},
        "blobs": _write_listing(folder / "blobs.jsonl", snap.blobs),
        "missing": report.missing, "corrupt": report.corrupt,
    }
    if originals is not None:
        manifest["originals"] = _write_listing(folder / "originals.jsonl", kept)
    heads = _copy_heads(heads_file, folder, snap.head_seq)
    if heads is not None:
        manifest["audit_heads"] = heads
    if manifest_key is not None:
        manifest[SIGNATURE] = {"alg": "HMAC-SHA256",
                               "hmac": _manifest_mac(manifest_key, manifest)}
    _write_durably(folder / "manifest.json", json.dumps(manifest, indent=2).encode())
    _write_durably(dest / "LATEST", (name + "\n").encode())
    return report


def _write_listing(path: Path, entries: list[BlobEntry]) -> dict[str, Any]:
    """Write a snapshot's list of blobs (what each copy was checked to be); its manifest
    entry."""
    listing = "".join(json.dumps({"key": e.key, "size": e.size, "sha256": e.sha256}) + "\n"
                      for e in entries).encode()
    _write_durably(path, listing)
    return {"file": path.name, "count": len(entries),
            "sha256": hashlib.sha256(listing).hexdigest()}


def _copy_all(blobs: BlobStore, entries: list[BlobEntry], dest: Path, part: str,
              report: BackupReport, progress: Progress, known: dict[str, str]) -> None:
    """Copy ``entries`` of ``blobs`` into ``dest/<part>/`` (those already there and whole
    are kept), counting in ``report``; each entry is updated to what its copy was checked
    to be (size and digest), also for blobs the index recorded none of, so that a restore
    can check each."""
    root = dest / part
    with open(dest / f"{part}.jsonl", "a") as catalogue:
        for position, entry in enumerate(entries):
            target = _blob_path(root, entry.key)
            # A copy already in the backup is re-used when it is still whole (its size: a
            # file cut short is copied again; a full check is the restore's).
            if entry.key in known and target.exists() and (
                    entry.sha256 is None or known[entry.key] == entry.sha256) and (
                    entry.size < 0 or _plain_size(target) == entry.size):
                if entry.sha256 is None or entry.size < 0:
                    size = _plain_size(target)
                    entries[position] = BlobEntry(entry.key, size if size >= 0 else entry.size,
                                                  known[entry.key])
                report.reused += 1
                progress(1)
                continue
            try:
                size, digest = _copy_blob(blobs, entry, target)
            except KeyError:
                report.missing.append(entry.key)  # deleted (or lost) since the snapshot
                progress(1)
                continue
            if (entry.sha256 and digest != entry.sha256) or size < 0 or (
                    entry.size >= 0 and size != entry.size):
                report.corrupt.append(entry.key)  # the live copy does not match its digest
                target.unlink(missing_ok=True)
            else:
                entries[position] = BlobEntry(entry.key, size, digest)
                catalogue.write(json.dumps({"key": entry.key, "sha256": digest}) + "\n")
                catalogue.flush()
                report.copied += 1
                report.bytes_copied += size
            progress(1)
        os.fsync(catalogue.fileno())


# -- restore -------------------------------------------------------------------------------------

# Which key signed a restored backup's manifest (RestoreReport.signed_by).
SIGNED_BY_CURRENT = "current"
SIGNED_BY_RETIRED = "retired"


@dataclass
class RestoreReport:
    """What a restore rebuilt, and which key signed its manifest: :data:`SIGNED_BY_CURRENT`,
    :data:`SIGNED_BY_RETIRED` (a backup made before a key rotation), or "" (not checked)."""

    snapshot: Path
    database: str
    blobs: int = 0
    signed_by: str = ""


def _snapshot_folder(src: Path, name: str = "") -> Path:
    if not name:
        latest = src / "LATEST"
        if not latest.exists():
            raise ImageShareError(f"{src} is not an ImageShare backup (no LATEST)")
        name = latest.read_text().strip()
    # A snapshot is a folder of ``snapshots/``: a name with a separator or ``..`` (from the
    # command line or an edited LATEST) would read a manifest from elsewhere.
    if not name or Path(name).name != name or name.startswith("."):
        raise ImageShareError(f"{name!r} is not the name of a snapshot")
    folder = src / "snapshots" / name
    if not (folder / "manifest.json").exists():
        raise ImageShareError(f"no snapshot {name!r} in {src}")
    return folder


def _read_manifest(folder: Path, manifest_key: bytes | None = None,
                   retired_keys: Sequence[bytes] = ()) -> tuple[dict[str, Any], str]:
    """The snapshot's manifest, its index file and blob list checked against their digests
    (and, given the installation key ``manifest_key``, its signature, which may also be that
    of one of the ``retired_keys``), with which key signed it (:data:`SIGNED_BY_CURRENT`,
    :data:`SIGNED_BY_RETIRED`, or "" when no key was given); ImageShareError naming what is
    wrong otherwise."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ImageShareError("unknown backup format")
        files = {part: (str(manifest[part]["file"]), str(manifest[part]["sha256"]))
                 for part in ("index", "blobs", "originals")
                 if part != "originals" or part in manifest}
        database = str(manifest["database"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageShareError(f"the backup's manifest is damaged ({type(exc).__name__})"
                              ) from exc
    signed_by = ""
    if manifest_key is not None:
        signed_by = _check_signature(manifest, manifest_key, retired_keys)
    # The restore reads these very files: a manifest naming others would have one file
    # checked and another restored.
    if database not in INDEX_FILES:
        raise ImageShareError("the backup's manifest names an unknown kind of index")
    expected = {"index": INDEX_FILES[database], **LISTING_FILES}
    if any(files[part][0] != expected[part] for part in files):
        raise ImageShareError("the backup's manifest names files a backup does not write")
    for part, what in (("index", "index file"), ("blobs", "blob list"),
                       ("originals", "list of uploads' originals")):
        if part not in files:
            continue
        name, digest = files[part]
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise ImageShareError(f"the backup's {what} is missing")
        if _sha256_file(path) != digest:
            raise ImageShareError(f"the backup's {what} does not match its digest")
    if manifest.get("missing") or manifest.get("corrupt"):
        raise ImageShareError("this snapshot is incomplete (blobs were missing or corrupt when "
                              "it was taken); restore another one")
    return manifest, signed_by


def _check_signature(manifest: dict[str, Any], installation_key: bytes,
                     retired_keys: Sequence[bytes] = ()) -> str:
    """Which key signed the manifest: :data:`SIGNED_BY_CURRENT` for ``installation_key``,
    else :data:`SIGNED_BY_RETIRED` for one of ``retired_keys``; a manifest that is unsigned
    or signed by none of them is refused."""
    signature = manifest.get(SIGNATURE)
    if not isinstance(signature, dict) or not isinstance(signature.get("hmac"), str):
        raise ImageShareError("the backup's manifest is not signed (a backup of an older "
                              "version, or edited): it cannot be shown to be this "
                              "installation's")
    if signature.get("alg") == "HMAC-SHA256":
        signed = signature["hmac"].encode()
        if hmac.compare_digest(signed, _manifest_mac(installation_key, manifest).encode()):
            return SIGNED_BY_CURRENT
        if any(hmac.compare_digest(signed, _manifest_mac(key, manifest).encode())
               for key in retired_keys):
            return SIGNED_BY_RETIRED
    raise ImageShareError("the backup's manifest does not carry this installation's "
                          "signature: it was edited, or the secret key is not the one of "
                          "the installation that wrote it")


def _entries(folder: Path, listing: str = "blobs.jsonl") -> Iterator[BlobEntry]:
    for number, line in enumerate((folder / listing).read_text().splitlines(), 1):
        try:
            item = json.loads(line)
            entry = BlobEntry(str(item["key"]), int(item["size"]),
                              None if item["sha256"] is None else str(item["sha256"]))
            check_key(entry.key)
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageShareError(f"the backup's blob list is damaged (line {number})"
                                  ) from exc
        yield entry


def _check_audit_trail(url: str, trail_problems: TrailCheck | None, note: str = "") -> None:
    """Refuse an index whose audit trail's hash chain shows rows edited, deleted, inserted or
    moved, as ``trail_problems`` finds them (the manifest's digests prove nothing against
    someone who can write the backup: they are not secret)."""
    if trail_problems is None:
        return
    engine = create_engine(url)
    try:
        problems = trail_problems(engine)
    except Exception as exc:  # noqa: BLE001 - an index that cannot be read is damaged
        raise ImageShareError(f"the backup's index cannot be read ({type(exc).__name__})"
                              f"{note}") from exc
    finally:
        engine.dispose()
    if problems:
        raise ImageShareError(f"the backup's audit trail was edited ({len(problems)} "
                              f"problem(s), first: {problems[0]}){note}")


def _check_blob(blobs: BlobStore, root: Path, entry: BlobEntry) -> None:
    """Refuse a blob of the backup that is missing, of another size or another digest."""
    path = _blob_path(root, entry.key)
    if not path.is_file() or _plain_size(path) != entry.size:
        raise ImageShareError(f"blob {entry.key} is missing from the backup or damaged")
    if _is_sealed(path):
        if not isinstance(blobs, EncryptedBlobStore):
            raise ImageShareError("the backup's blobs are encrypted: restore with "
                                  "IMAGESHARE_ENCRYPT_BLOBS on and the secret key of the "
                                  "installation that wrote them")
        try:
            with open(path, "rb") as fh:
                plain = blobs.digest_of_stored(entry.key, fh)
        except StorageError as exc:
            raise ImageShareError(f"blob {entry.key} in the backup is damaged (it fails "
                                  "authentication)") from exc
        digest = plain.sha256
    elif entry.sha256:
        digest = _sha256_file(path)
    else:
        return
    if entry.sha256 and digest != entry.sha256:
        raise ImageShareError(f"blob {entry.key} in the backup is damaged (it does not match "
                              "its digest)")


def _empty_database(url: str) -> bool:
    engine = create_engine(url)
    try:
        return not inspect(engine).get_table_names()
    finally:
        engine.dispose()


def restore(src: Path, database_url: str, blobs: BlobStore, snapshot: str = "",
            pg_bin_dir: str = "", progress: Progress = _noop, on_total: Progress = _noop,
            trail_problems: TrailCheck | None = None,
            heads_file: Path | None = None, originals: BlobStore | None = None,
            manifest_key: bytes | None = None,
            retired_manifest_keys: Sequence[bytes] = ()) -> RestoreReport:
    """Rebuild an installation from a backup: the index into ``database_url`` (which must be
    empty), every blob into ``blobs`` and every kept original of an upload into
    ``originals``, each checked against its digest first, and the snapshot's signed audit
    chain heads into ``heads_file`` (which must be empty); the index is refused when
    ``trail_problems`` (the audit chain's check) finds any, the whole backup when, given the
    installation key ``manifest_key``, its manifest is not signed with it nor with one of the
    retired installation keys ``retired_manifest_keys`` (a backup made before a key rotation;
    the report says which signed it).

    The blobs are written first and the index last: a restore that stops half-way (a full
    disk, an object store that went away) leaves no index naming blobs that are not there,
    and can be run again. Blobs from a backup of an installation without encryption are
    sealed when ``blobs`` encrypts."""
    try:
        return _restore(src, database_url, blobs, snapshot, pg_bin_dir, progress, on_total,
                        trail_problems, heads_file, originals, manifest_key,
                        retired_manifest_keys)
    except OSError as exc:  # an unreadable backup, a full or failing disk
        raise StorageError(f"the restore stopped ({exc.strerror or type(exc).__name__}); "
                           "run it again once the cause is removed") from exc


def _restore(src: Path, database_url: str, blobs: BlobStore, snapshot: str, pg_bin_dir: str,
             progress: Progress, on_total: Progress, trail_problems: TrailCheck | None,
             heads_file: Path | None, originals: BlobStore | None,
             manifest_key: bytes | None, retired_keys: Sequence[bytes]) -> RestoreReport:
    """The work of :func:`restore`."""
    folder = _snapshot_folder(src, snapshot)
    manifest, signed_by = _read_manifest(folder, manifest_key, retired_keys)
    heads = _checked_heads(folder, manifest, heads_file)
    parts = [(blobs, "blobs", "blob store")]
    if originals is not None and "originals" in manifest:
        parts.append((originals, "originals", "store of uploads' originals"))
    listed = {part: list(_entries(folder, f"{part}.jsonl")) for _store, part, _what in parts}
    for _store, part, what in parts:
        if manifest[part].get("count") not in (None, len(listed[part])):
            raise ImageShareError(f"the backup's list for the {what} does not have the blobs "
                                  "its manifest counts")
    on_total(sum(len(entries) for entries in listed.values()))
    # Everything is checked (size and digest) before anything is written.
    for store, part, _what in parts:
        for entry in listed[part]:
            _check_blob(store, src / part, entry)
    # Blobs of another installation left in the target would be indexed by the first start's
    # recovery (it indexes every blob the index does not know): images deleted there would
    # come back. Those of this backup may be there from a restore that stopped half-way.
    for store, part, what in parts:
        restoring = {e.key for e in listed[part]}
        stray = next((key for key in store.keys() if key not in restoring), None)
        if stray is not None:
            raise ImageShareError(f"the target {what} is not empty (blob {stray} is not in "
                                  "the backup); restore into an empty installation")
    url = make_url(database_url)
    index_file = folder / manifest["index"]["file"]
    if manifest["database"] == "sqlite":
        _check_audit_trail(f"sqlite:///file:{index_file}?mode=ro&uri=true", trail_problems)
    if manifest["database"] != url.get_backend_name():
        raise ImageShareError(f"the backup holds a {manifest['database']} index; the target "
                              f"is {url.get_backend_name()}")
    if url.get_backend_name() == "sqlite":
        target = Path(url.database or "")
        if target.exists() and target.stat().st_size and not _empty_database(database_url):
            raise ImageShareError(f"{target} already holds an index; restore into an empty "
                                  "installation")
    elif not _empty_database(database_url):
        raise ImageShareError("the target database is not empty; restore into an empty "
                              "installation")
    report = RestoreReport(folder, manifest["database"], signed_by=signed_by)
    written = _restore_blobs(src, parts, listed, report, progress)
    if url.get_backend_name() == "sqlite":
        _install_sqlite_index(index_file, str(manifest["index"]["sha256"]), target)
    else:
        args, env = _libpq(database_url)
        done = subprocess.run(
            [pg_tool("pg_restore", pg_bin_dir), *args, "--no-owner", "--no-privileges",
             "--exit-on-error", "--single-transaction", str(index_file)],
            env=env, capture_output=True, text=True, timeout=24 * 3600)
        if done.returncode != 0:
            raise StorageError(f"pg_restore failed: {done.stderr.strip()[-500:]}")
        # A dump cannot be read before it is restored: its audit trail is checked now; the
        # blobs written for it are taken out again when it is refused (the index is left in
        # the target for a person to look at).
        try:
            _check_audit_trail(database_url, trail_problems, "; the restored index is left "
                               "in the target database for inspection")
        except ImageShareError:
            for store, key in written:
                store.delete(key)
            raise
    if heads is not None and heads_file is not None:
        heads_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_durably(heads_file, heads)
        os.chmod(heads_file, 0o600)
    return report


def _restore_blobs(src: Path, parts: list[tuple[BlobStore, str, str]],
                   listed: dict[str, list[BlobEntry]], report: RestoreReport,
                   progress: Progress) -> list[tuple[BlobStore, str]]:
    """Put every listed blob of the backup into its store, each checked against its digest
    as it is written; returns the (store, key) pairs written."""
    written: list[tuple[BlobStore, str]] = []
    for store, part, _what in parts:
        for entry in listed[part]:
            path = _blob_path(src / part, entry.key)
            with open(path, "rb") as fh:
                if isinstance(store, EncryptedBlobStore) and _is_sealed(path):
                    stored = store.put_stored(entry.key, fh, path.stat().st_size)
                else:  # a plaintext copy is sealed on the way in by an encrypting store
                    stored = store.put(entry.key, fh, path.stat().st_size)
            written.append((store, entry.key))
            if entry.sha256 and stored.sha256 != entry.sha256:
                store.delete(entry.key)
                raise StorageError(f"blob {entry.key} in the backup does not match its digest")
            report.blobs += 1
            progress(1)
    return written


def _install_sqlite_index(source: Path, sha256: str, target: Path) -> None:
    """Copy the backup's SQLite index to ``target`` durably, checking on the way that it is
    still the file whose digest the manifest gives (it is read again, after the blobs)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for suffix in ("-wal", "-shm"):
        Path(str(target) + suffix).unlink(missing_ok=True)
    tmp = target.with_name(target.name + ".restoring")
    digest = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ImageShareError("the backup's index file changed while it was restored "
                                  "(it no longer matches its digest)")
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


def _checked_heads(folder: Path, manifest: dict[str, Any], heads_file: Path | None
                   ) -> bytes | None:
    """The snapshot's signed heads, checked against the manifest, for ``heads_file``; refused
    when that file already holds heads (another installation's)."""
    listed = manifest.get("audit_heads")
    if not listed or heads_file is None:
        return None
    try:
        data = (folder / str(listed["file"])).read_bytes()
    except (OSError, KeyError, TypeError) as exc:
        raise ImageShareError("the backup's signed audit heads are missing") from exc
    if hashlib.sha256(data).hexdigest() != listed.get("sha256"):
        raise ImageShareError("the backup's signed audit heads do not match their digest")
    if heads_file.exists() and heads_file.stat().st_size:
        raise ImageShareError(f"{heads_file} already holds signed audit heads; restore into "
                              "an empty installation")
    return data


# -- scrub ---------------------------------------------------------------------------------------

def scrub(engine: Engine, blobs: BlobStore, progress: Progress = _noop,
          on_total: Progress = _noop) -> ScrubReport:
    """Read every stored blob and compare it with its recorded SHA-256 and size; a digest not
    yet recorded (instances stored before digests were kept) is recorded now."""
    report = ScrubReport()
    with engine.connect() as conn:
        rows = conn.execute(select(instances.c.pk, instances.c.sop_uid, instances.c.blob_key,
                                   instances.c.size, instances.c.sha256)
                            .order_by(instances.c.pk)).all()
    on_total(len(rows))
    for pk, sop_uid, key, size, recorded in rows:
        digest = hashlib.sha256()
        read = 0
        try:
            with blobs.open(key) as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                    read += len(chunk)
        except KeyError:
            report.missing.append((sop_uid, key))
            progress(1)
            continue
        except StorageError:  # an encrypted blob whose chunk fails authentication
            report.checked += 1
            report.corrupt.append((sop_uid, key))
            progress(1)
            continue
        report.checked += 1
        report.bytes_read += read
        if recorded is None:
            with engine.begin() as conn:
                conn.execute(update(instances).where(instances.c.pk == pk,
                                                     instances.c.sha256.is_(None))
                             .values(sha256=digest.hexdigest()))
            report.recorded += 1
        elif digest.hexdigest() != recorded:
            report.corrupt.append((sop_uid, key))
        elif read != size:
            report.wrong_size.append((sop_uid, key))
        progress(1)
    return report
