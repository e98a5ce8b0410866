"""Tamper evidence for the audit trail: every row chained by SHA-256 to the one before it.

Each audit row carries a sequence number ``seq`` (1, 2, 3 ... with no gap), the hash of the
row before it (``prev_hash``) and its own hash (``row_hash`` = SHA-256 of the previous hash and
the row's canonical content, sequence number included). The newest ``seq`` and hash are kept in
the one-row table ``audit_chain_head``; a writer updates that row first, which serialises
writers on PostgreSQL (row lock held to commit) and on SQLite (the database write lock), so
concurrent processes never fork the chain.

The head is also exported, signed with an HMAC whose key is derived from the installation key
(``secret_key`` / ``secret_key_file``, kept apart from the database), to a file of signed heads
(``audit_head_file``): periodically by the server and on demand (``imageshare audit head``). A
database rewritten wholesale (rows deleted at the end, the head row edited) then no longer
matches a signed head. :func:`verify_chain` walks the rows and names each one that was edited,
deleted, inserted or moved.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update

from imageshare.storage.index.database import make_commits_durable
from imageshare.storage.index.schema import audit_chain_head, audit_events

GENESIS = "0" * 64
HEAD_ROW = 1
_CONTENT = ("at", "actor", "actor_kind", "source", "action", "outcome", "patient_id",
            "study_uid", "instance_count", "detail")


def _at_text(value: datetime | str) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:  # SQLite gives back the UTC moment without its zone
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_hash(prev_hash: str, seq: int, row: dict[str, Any]) -> str:
    """The hash of one audit row (version 1 of the canonical form; never change it)."""
    content = [seq] + [_at_text(row["at"]) if k == "at" else row[k] for k in _CONTENT]
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(f"v1\n{prev_hash}\n{canonical}".encode()).hexdigest()


# Built once: the audit write is on every request's path.
# Writing the head row first takes the lock (PostgreSQL row lock, SQLite write lock) before
# its value is read, so two transactions can never extend the same head.
_LOCK_HEAD = (update(audit_chain_head).where(audit_chain_head.c.id == HEAD_ROW)
              .values(seq=audit_chain_head.c.seq)
              .returning(audit_chain_head.c.seq, audit_chain_head.c.hash))
_MOVE_HEAD = (update(audit_chain_head).where(audit_chain_head.c.id == HEAD_ROW)
              .values(seq=bindparam("new_seq"), hash=bindparam("new_hash")))
_INSERT_ROWS = insert(audit_events)
_ADD_ONE_AND_MOVE_HEAD = _MOVE_HEAD.add_cte(insert(audit_events).values(
    {name: bindparam(name) for name in (*_CONTENT, "seq", "prev_hash", "row_hash")}
).cte("added"))


def append(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert audit rows at the end of the chain, inside ``conn``'s transaction."""
    head = conn.execute(_LOCK_HEAD).first()
    seq, prev = (head[0], head[1]) if head else (0, GENESIS)
    chained = []
    for row in rows:
        seq += 1
        digest = row_hash(prev, seq, row)
        chained.append({**row, "seq": seq, "prev_hash": prev, "row_hash": digest})
        prev = digest
    if head is None:
        conn.execute(_INSERT_ROWS, chained)
        conn.execute(insert(audit_chain_head).values(id=HEAD_ROW, seq=seq, hash=prev))
    elif len(chained) == 1 and conn.dialect.name == "postgresql":
        # The row and the new head in one statement (one round trip fewer on every audited
        # request): the insert rides along as a data-modifying WITH of the head's update.
        conn.execute(_ADD_ONE_AND_MOVE_HEAD, {**chained[0], "new_seq": seq, "new_hash": prev})
    else:
        conn.execute(_INSERT_ROWS, chained)
        conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": prev})


def chain_existing(conn: Connection) -> int:
    """Chain rows written before tamper evidence (seq still empty), oldest first; returns how
    many (used by the migration)."""
    head = conn.execute(select(audit_chain_head.c.seq, audit_chain_head.c.hash)
                        .where(audit_chain_head.c.id == HEAD_ROW)).first()
    seq, prev = (head[0], head[1]) if head else (0, GENESIS)
    count = 0
    last_pk = 0
    while True:
        batch = conn.execute(select(
            audit_events.c.pk, *(audit_events.c[k] for k in _CONTENT)).where(
            audit_events.c.seq.is_(None), audit_events.c.pk > last_pk)
            .order_by(audit_events.c.pk).limit(1000)).mappings().all()
        if not batch:
            break
        for row in batch:
            seq += 1
            digest = row_hash(prev, seq, dict(row))
            conn.execute(update(audit_events).where(audit_events.c.pk == row["pk"])
                         .values(seq=seq, prev_hash=prev, row_hash=digest))
            prev = digest
            last_pk = row["pk"]
            count += 1
    if head is None:
        conn.execute(insert(audit_chain_head).values(id=HEAD_ROW, seq=seq, hash=prev))
    else:
        conn.execute(update(audit_chain_head).where(audit_chain_head.c.id == HEAD_ROW)
                     .values(seq=seq, hash=prev))
    return count


# -- signed heads ------------------------------------------------------------------------------

def head_key(installation_key: bytes) -> bytes:
    """The HMAC key for chain heads, derived from the installation key."""
    return hashlib.sha256(b"imageshare audit chain head\0" + installation_key).digest()


def _signature(key: bytes, seq: int, digest: str, at: str) -> str:
    return hmac.new(key, f"{seq}\n{digest}\n{at}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class SignedHead:
    """The chain head at one moment, with its HMAC."""

    seq: int
    hash: str
    at: str
    hmac: str

    def line(self) -> str:
        """The head as one JSON line of the heads file."""
        return json.dumps({"seq": self.seq, "hash": self.hash, "at": self.at,
                           "hmac": self.hmac}, sort_keys=True)


def current_head(engine: Engine) -> tuple[int, str]:
    """The newest sequence number and hash (0 and the genesis hash for an empty trail)."""
    with engine.connect() as conn:
        head = conn.execute(select(audit_chain_head.c.seq, audit_chain_head.c.hash)
                            .where(audit_chain_head.c.id == HEAD_ROW)).first()
    return (head[0], head[1]) if head else (0, GENESIS)


def export_head(engine: Engine, key: bytes, heads_file: Path) -> SignedHead:
    """Append the current head, signed, to ``heads_file`` (fsynced) and return it. The rows
    up to the head are on disk first: a head never names a row that power loss can take."""
    seq, digest = current_head(engine)
    make_commits_durable(engine)
    at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    head = SignedHead(seq, digest, at, _signature(key, seq, digest, at))
    heads_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(heads_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (head.line() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return head


# -- verification ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChainProblem:
    """One place where the trail does not match its chain."""

    kind: str        # edited, deleted, inserted, moved, head, signature
    seq: int | None  # the row's place in the chain (None: not chained)
    pk: int | None   # the row's primary key, when there is a row
    message: str

    def __str__(self) -> str:
        where = f"row seq={self.seq}" if self.seq is not None else "row"
        if self.pk is not None:
            where += f" (pk {self.pk})"
        return f"{self.kind}: {where}: {self.message}"


@dataclass
class ChainReport:
    """What :func:`verify_chain` found."""

    rows: int
    head_seq: int
    heads_checked: int
    problems: list[ChainProblem]

    @property
    def intact(self) -> bool:
        """True when nothing was edited, deleted, inserted or moved."""
        return not self.problems


def _read_heads(heads_file: Path | None) -> list[dict[str, Any]]:
    if heads_file is None or not heads_file.exists():
        return []
    heads = []
    for number, line in enumerate(heads_file.read_text().splitlines(), 1):
        if line.strip():
            try:
                heads.append(json.loads(line))
            except ValueError:
                heads.append({"line": number, "broken": True})
    return heads


def verify_chain(engine: Engine, key: bytes | None = None, heads_file: Path | None = None,
                 retired: Sequence[bytes] = ()) -> ChainReport:
    """Walk every audit row in chain order and report each that was edited, deleted, inserted
    or moved; check the head row and every signed head (when ``key``, the head key of the
    installation key, is given). After a key rotation a head signed before it carries a
    retired key's signature: ``retired`` are the head keys of the retired installation keys,
    and a head is good when ``key`` or one of them signs it (a head signed by none is
    reported, each head on its own); what a good head names is checked alike.

    Safe on a live installation: the signed heads are read before the rows (every head in the
    file then names a row already committed), and rows committed while the walk ran, up to the
    head row read at its end, are walked too, so that a write in the meantime is never taken
    for deleted rows. Memory stays bounded: only the hashes the signed heads name are kept."""
    signed = _read_heads(heads_file) if key is not None else []
    wanted: set[int] = set()
    for entry in signed:
        try:
            wanted.add(int(entry["seq"]))
        except (KeyError, TypeError, ValueError):
            pass
    walk = _Walk(wanted)
    with engine.connect() as conn:
        unchained = conn.execute(select(audit_events.c.pk).where(audit_events.c.seq.is_(None))
                                 .order_by(audit_events.c.pk)).scalars().all()
        for pk in unchained:
            walk.problems.append(ChainProblem("inserted", None, pk,
                                              "a row outside the chain (no sequence number)"))
        walk.rows_of(conn, select(audit_events).where(audit_events.c.seq.is_not(None)))
        head = conn.execute(select(audit_chain_head.c.seq, audit_chain_head.c.hash)
                            .where(audit_chain_head.c.id == HEAD_ROW)).first()
        head_seq, head_hash = (head[0], head[1]) if head else (0, GENESIS)
        if head_seq > walk.last_seq:
            # Rows written while the walk ran: the head is moved in the same transaction as
            # its rows, so every row up to the head read now is committed and visible.
            walk.rows_of(conn, select(audit_events).where(
                audit_events.c.seq > walk.last_seq, audit_events.c.seq <= head_seq))
    problems = walk.problems
    last_seq = walk.last_seq
    if head_seq > last_seq:
        problems.append(ChainProblem(
            "deleted", last_seq + 1, None,
            f"the chain ends at seq={last_seq} but its head says seq={head_seq}: the newest "
            "rows were deleted"))
    elif head_seq < last_seq or (last_seq and walk.last_hash != head_hash):
        problems.append(ChainProblem(
            "head", last_seq, None, "the head row does not match the newest row"))
    for entry in signed:
        problems += _check_signed_head(entry, [key or b"", *retired], walk.hashes, last_seq)
    return ChainReport(walk.rows, head_seq, len(signed), problems)


class _Walk:
    """The state of a walk along the chain: where it is, what it found, and the hashes of
    the rows the signed heads name."""

    def __init__(self, wanted: set[int]) -> None:
        self.wanted = wanted
        self.hashes: dict[int, str] = {}
        self.problems: list[ChainProblem] = []
        self.rows = 0
        self.expected_seq = 1
        self.prev = GENESIS
        self.last_seq = 0
        self.last_hash = ""

    def rows_of(self, conn: Connection, query: Any) -> None:
        """Check the rows ``query`` selects, in chain order, after those already walked."""
        result = conn.execution_options(stream_results=True, yield_per=2000).execute(
            query.order_by(audit_events.c.seq, audit_events.c.pk))
        for row in _mappings(result):
            self.check(row)

    def check(self, row: dict[str, Any]) -> None:
        """Check one row against the row before it."""
        self.rows += 1
        seq, pk = row["seq"], row["pk"]
        if self.rows > 1 and seq == self.last_seq:
            self.problems.append(ChainProblem("inserted", seq, pk,
                                              "a second row with this sequence number"))
            return
        if seq > self.expected_seq:
            missing = (f"row seq={self.expected_seq}" if seq == self.expected_seq + 1
                       else f"rows seq={self.expected_seq}..{seq - 1}")
            self.problems.append(ChainProblem("deleted", self.expected_seq, None,
                                              f"{missing} missing before seq={seq}"))
            self.prev = row["prev_hash"] or ""
        own = row_hash(row["prev_hash"] or "", seq, row)
        if own != row["row_hash"]:
            self.problems.append(ChainProblem(
                "edited", seq, pk, "its content does not match its hash (edited, or moved "
                "here from another place in the chain)"))
        elif row["prev_hash"] != self.prev:
            self.problems.append(ChainProblem(
                "moved", seq, pk, "it does not follow the row before it (inserted or "
                "reordered here, or the row before was rewritten with a new hash)"))
        if seq in self.wanted:
            self.hashes[seq] = row["row_hash"]
        self.prev = row["row_hash"]
        self.last_seq, self.last_hash = seq, row["row_hash"]
        self.expected_seq = seq + 1


def chain_problems(engine: Engine) -> list[str]:
    """What :func:`verify_chain` finds wrong in the audit trail of ``engine`` (nothing when
    it is intact), each said in a line."""
    return [str(problem) for problem in verify_chain(engine).problems]


def _mappings(result: Any) -> Iterable[dict[str, Any]]:
    for row in result.mappings():
        yield dict(row)


def _check_signed_head(entry: dict[str, Any], keys: Sequence[bytes], hashes: dict[int, str],
                       last_seq: int) -> list[ChainProblem]:
    """What is wrong with one signed head: not signed by any of ``keys`` (the current head
    key first), or naming a row the chain no longer has as it was signed."""
    if entry.get("broken"):
        return [ChainProblem("signature", None, None,
                             f"line {entry['line']} of the heads file cannot be read")]
    try:
        seq, digest, at = int(entry["seq"]), str(entry["hash"]), str(entry["at"])
        signed = str(entry["hmac"])
        good = any(hmac.compare_digest(_signature(key, seq, digest, at), signed)
                   for key in keys)
    except (KeyError, TypeError, ValueError):
        return [ChainProblem("signature", None, None, "a head in the heads file is malformed")]
    if not good:
        return [ChainProblem("signature", seq, None,
                             f"the head exported at {at} has a wrong signature (edited)")]
    if seq == 0:
        return []
    if seq > last_seq:
        return [ChainProblem("deleted", last_seq + 1, None,
                             f"the head signed at {at} names seq={seq}, past the chain's end "
                             f"at seq={last_seq}: rows were deleted")]
    if hashes.get(seq) != digest:
        return [ChainProblem("edited", seq, None,
                             f"the chain no longer has the hash signed at {at} for this row "
                             "(rewritten)")]
    return []
