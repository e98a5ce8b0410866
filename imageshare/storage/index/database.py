"""Engine creation and schema migration for the index (SQLite in WAL mode or PostgreSQL)."""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError

from imageshare.domain.errors import ConfigurationError
from imageshare.storage.index.writer_gate import TIMED_OUT, WriterGate, gate_for

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
log = logging.getLogger("imageshare.index")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
BUSY_TIMEOUT = 30  # seconds a writer on SQLite waits for the write lock before it is refused


def make_commits_durable(engine: Engine) -> None:
    """Put every transaction committed so far on disk. On SQLite with ``synchronous=NORMAL``
    a commit waits in the write-ahead log until the next checkpoint, and power loss can take
    it: this flushes that log. (PostgreSQL with ``synchronous_commit`` on, and SQLite with
    FULL, have already done so at each commit.)"""
    if engine.dialect.name != "sqlite":
        return
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        fd = os.open(f"{database}-wal", os.O_RDONLY)
    except FileNotFoundError:
        return  # no log: every commit is in the database file, synced at its checkpoint
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_engine(
    url: str, sqlite_synchronous: str = "NORMAL", for_writer: bool = False
) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    ``for_writer``: on SQLite, transactions begun explicitly start with BEGIN IMMEDIATE,
    taking the write lock first, so that writers in several processes never read a snapshot
    they cannot update; reads (statements run without ``begin()``) take no lock.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT},
            pool_size=8,
            max_overflow=16,
        )
        synchronous = sqlite_synchronous.upper()
        if synchronous not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ConfigurationError("sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
            cur.close()
            if for_writer:
                dbapi_conn.isolation_level = None  # transactions are begun below

        # Marks reads (below) and ends a writer's turn at the gate after its commit.
        engine._connection_cls = type(  # noqa: SLF001
            "GatedSqliteConnection", (_SqliteConnection,),
            {"gate": gate_for(Path(parsed.database), BUSY_TIMEOUT) if parsed.database
             and parsed.database != ":memory:" and not parsed.database.startswith("file:")
             else None})
        if for_writer:

            @event.listens_for(engine, "begin")
            def _begin(conn) -> None:  # noqa: ANN001
                if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                    return  # each statement is its own transaction
                # Reads (a connection's statements without begin()) take no lock; a
                # transaction begun explicitly (engine.begin(), conn.begin()) is a writer.
                if conn.reading:
                    conn.exec_driver_sql("BEGIN")
                else:
                    _begin_immediate(conn)

        return engine
    # No ping before each use (a round trip on every check-out, several per request): a
    # pooled connection is checked locally instead (below), connections are replaced after
    # POOL_RECYCLE_SECONDS, TCP keepalives expose a peer that vanished silently, and the hot
    # read paths run through :func:`run_transaction`, which retries once on a fresh
    # connection when the database dropped the one it was given.
    engine = create_engine(
        parsed, pool_size=10, max_overflow=20, pool_recycle=POOL_RECYCLE_SECONDS,
        connect_args={"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                      "keepalives_count": 3})
    event.listen(engine, "checkout", _refuse_dropped_connection)
    return engine


POOL_RECYCLE_SECONDS = 1800


class _SqliteConnection(Connection):
    """A connection that knows whether its transaction began by itself, at the first
    statement of ``engine.connect()`` (reads: a plain BEGIN, which in WAL mode waits for no
    writer), or by ``begin()`` (writes: BEGIN IMMEDIATE), and that ends its turn at the
    writers' gate (:class:`WriterGate`) once its transaction has ended."""

    reading = False
    gate: WriterGate | None = None

    def _autobegin(self) -> None:
        self.reading = True
        try:
            super()._autobegin()
        finally:
            self.reading = False

    def _then_leave_gate(self, end: Callable[[], None]) -> None:
        try:
            end()
        finally:
            if self.gate is not None:
                self.gate.leave(self)

    def _commit_impl(self) -> None:
        self._then_leave_gate(super()._commit_impl)

    def _rollback_impl(self) -> None:
        self._then_leave_gate(super()._rollback_impl)

    def close(self) -> None:
        """Close; a turn at the gate that no commit or rollback ended (a connection the
        database dropped) ends here."""
        self._then_leave_gate(super().close)


def _begin_immediate(conn: Connection) -> None:
    """BEGIN IMMEDIATE (SQLite's write lock), after this connection's turn at the gate. When
    the turn did not come within the busy timeout, SQLite's lock is tried once without
    waiting again: refused ("database is locked") after one busy timeout, as without the gate."""
    gate: WriterGate | None = getattr(conn, "gate", None)
    turn = gate.enter(conn) if gate is not None else ""
    try:
        if turn == TIMED_OUT:
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException:
        if gate is not None:
            gate.leave(conn)
        raise


def _refuse_dropped_connection(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """A pooled PostgreSQL connection the server has closed (restart, administrator,
    idle timeout, broken TCP) is found without a round trip: an idle connection receives
    nothing unasked but the server's goodbye, so anything to read means it must be looked at;
    the pool then replaces a dead one with a new connection."""
    from psycopg import OperationalError  # only PostgreSQL installations load the driver
    from psycopg.pq import ConnStatus

    if dbapi_conn.closed or dbapi_conn.pgconn.status != ConnStatus.OK:
        raise DisconnectionError("the pooled database connection is closed")
    waiting = select.poll()  # not select.select: a busy server has descriptors above 1024
    waiting.register(dbapi_conn.pgconn.socket, select.POLLIN)
    if not waiting.poll(0):
        return
    try:
        dbapi_conn.pgconn.consume_input()  # a notice keeps it alive; a goodbye or EOF does not
    except OperationalError as exc:
        raise DisconnectionError("the database closed the pooled connection") from exc
    if dbapi_conn.pgconn.status != ConnStatus.OK:
        raise DisconnectionError("the database closed the pooled connection")


def take_write_lock(conn: Connection) -> None:
    """Called first in a transaction that reads what it then changes (a count to increase, a
    total to check against a limit): on SQLite, the database's write lock is taken now
    (BEGIN IMMEDIATE), so that no other writer, in this process or another, commits between
    the read and the write. On PostgreSQL the reads say FOR UPDATE instead."""
    if conn.dialect.name != "sqlite":
        return
    dbapi = conn.connection.dbapi_connection
    if dbapi is not None and not dbapi.in_transaction:
        _begin_immediate(conn)


def run_read(engine: Engine, work: Callable[[Connection], T]) -> T:
    """``work`` (reads only) on a connection in autocommit: each statement is its own
    snapshot, with no BEGIN and ROLLBACK round trips around it. When the database dropped the
    pooled connection, the reads run once more on a fresh connection."""
    for attempt in (1, 2):
        try:
            with engine.connect() as conn:
                return work(conn.execution_options(isolation_level="AUTOCOMMIT"))
        except DBAPIError as exc:
            if attempt == 1 and exc.connection_invalidated:
                log.warning("the database dropped a pooled connection; retrying on a new one")
                continue
            raise
    raise AssertionError("unreachable")


def run_transaction(engine: Engine, work: Callable[[Connection], T]) -> T:
    """``work`` inside one transaction, committed once it returns.

    When the database dropped the connection before the commit was sent (a restart or
    failover since the connection was pooled), nothing was committed: the work runs once more
    on a fresh connection instead of failing the caller. A failure of the commit itself is
    not retried (its outcome is unknown) and reaches the caller.
    """
    for attempt in (1, 2):
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                result = work(conn)
            except DBAPIError as exc:
                if trans.is_active:
                    with contextlib.suppress(DBAPIError):
                        trans.rollback()
                if attempt == 1 and exc.connection_invalidated:
                    log.warning("the database dropped a pooled connection; retrying on a new one")
                    continue
                raise
            except BaseException:
                if trans.is_active:
                    trans.rollback()
                raise
            trans.commit()
            return result
    raise AssertionError("unreachable")


def _alembic_config(engine: Engine) -> Config:
    from alembic.config import Config  # loaded only when the schema is not at the head

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision(engine: Engine) -> str:
    """The newest migration this version of ImageShare knows."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head() or ""


@functools.cache  # the migrations do not change while the program runs
def newest_migration() -> str | None:
    """The head revision: the one migration no other follows, read from the migrations'
    ``revision`` and ``down_revision`` without loading alembic; None when that is not one
    revision (alembic then decides)."""
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("[0-9]*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)):
                if node.targets[0].id == "revision":
                    revisions.add(node.value.value)
                elif node.targets[0].id == "down_revision":
                    followed.add(node.value.value)
    heads = revisions - followed
    return heads.pop() if len(heads) == 1 else None


def _recorded_revision(engine: Engine) -> str | None:
    """The revision alembic recorded in the database; None when there is none (or no table
    yet)."""
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except DBAPIError:
        return None


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _check_reachable(engine: Engine) -> None:
    """Refuse (:class:`ConfigurationError`) a database that cannot be connected to, saying
    which (without its password) and the driver's reason: a server down, a database or role
    not made yet, a refused password, a folder that cannot be written."""
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = " ".join(str(exc.orig or exc).split())[:300] or type(exc).__name__
        where = engine.url.render_as_string(hide_password=True)
        raise ConfigurationError(
            f"the index database {where} cannot be reached: {reason} (check "
            "IMAGESHARE_DATABASE_URL; on PostgreSQL the database and its owner must exist)"
        ) from None


def migrate(engine: Engine, upgrade: bool = True) -> None:
    """Bring the schema to this version's head, or refuse with a clear message.

    A database written by a newer ImageShare (unknown revision) is always refused; an older
    one is upgraded only when ``upgrade`` is true.
    """
    _check_reachable(engine)
    newest = newest_migration()
    if newest is not None and _recorded_revision(engine) == newest:
        return  # the usual start: alembic (and its template engine) is not even loaded
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(engine)
    script = ScriptDirectory.from_config(cfg)
    current = current_revision(engine)
    head = script.get_current_head()
    if current == head:
        return
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise ConfigurationError(
            f"the index database is at revision {current}, newer than this ImageShare "
            f"(which knows up to {head}); upgrade ImageShare instead"
        )
    if not upgrade:
        raise ConfigurationError(
            f"the index database is at revision {current or 'empty'} but this ImageShare needs "
            f"{head}; run `imageshare db upgrade`"
        )
    with schema_transaction(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextlib.contextmanager
def schema_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction for changing the schema. On SQLite foreign keys are not enforced
    while it runs (rebuilding a table drops the old one, and ON DELETE CASCADE would take
    every row that refers to it along: sessions, API tokens, instances) and are checked
    before it commits: a change that leaves a reference broken is refused whole."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:  # only outside a transaction does SQLite take this
            _sqlite_pragma(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").first()
                    if broken is not None:
                        raise ConfigurationError(
                            f"the schema change would leave a row of {broken[0]} referring "
                            f"to a missing row of {broken[2]}; nothing was changed")
        finally:
            if sqlite:
                _sqlite_pragma(conn, "PRAGMA foreign_keys=ON")


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    """Run ``pragma`` on the connection's SQLite connection itself, outside any transaction."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        cursor.execute(pragma)
    finally:
        cursor.close()


def from_row(cls: type[T], row: Any) -> T:
    """A dataclass built from the like-named columns of a result row (mapping)."""
    return cls(**{name: row[name] for name in cls.__dataclass_fields__})  # type: ignore[attr-defined]  # T: a dataclass
