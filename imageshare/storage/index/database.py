"""Engine creation and schema migration for the index (SQLite in WAL mode or PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from imageshare.domain.errors import ConfigurationError

T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(
    url: str, sqlite_synchronous: str = "NORMAL", for_writer: bool = False
) -> Engine:
    """An engine for ``url``; SQLite gets WAL, foreign keys and a busy timeout.

    ``for_writer``: on SQLite, transactions start with BEGIN IMMEDIATE, taking the write lock
    first, so that writers in several processes never read a snapshot they cannot update.
    """
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8,
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
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            if for_writer:
                dbapi_conn.isolation_level = None  # transactions are begun below

        if for_writer:

            @event.listens_for(engine, "begin")
            def _begin_immediate(conn) -> None:  # noqa: ANN001
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(parsed, pool_size=10, max_overflow=20, pool_pre_ping=True)


def _alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision(engine: Engine) -> str:
    """The newest migration this version of ImageShare knows."""
    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head() or ""


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine, upgrade: bool = True) -> None:
    """Bring the schema to this version's head, or refuse with a clear message.

    A database written by a newer ImageShare (unknown revision) is always refused; an older
    one is upgraded only when ``upgrade`` is true.
    """
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
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def from_row(cls: type[T], row: Any) -> T:
    """A dataclass built from the like-named columns of a result row (mapping)."""
    return cls(**{name: row[name] for name in cls.__dataclass_fields__})  # type: ignore[attr-defined]  # T: a dataclass
