"""Connections and sessions to the ledger, and its Alembic migrations.

SQLite by default (``sqlite:///<APA_HOME>/apa.db``, WAL mode so the gateway and the worker can share
it), PostgreSQL with ``APA_DATABASE_URL=postgresql+psycopg://...``. Tables come only from the
migrations in ``migrations/`` (``apa ledger upgrade``), never from ``create_all``.
"""

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from apa.settings import get_settings
from ledger.errors import LedgerError

SOURCE_MIGRATIONS_DIR = Path(__file__).resolve().parents[1] / "migrations"
DEFAULT_CONNECT_TIMEOUT_S = 10
_ENGINES: dict[tuple[str, int, float | None], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _sqlite_pragmas(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event starts the transactions
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # a deleted row's bytes are zeroed, not left in a free page
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return on_connect


def _owner_only(path: Path) -> None:
    """The ledger holds personal data: its file is readable by its owner only (SQLite gives the WAL and
    shared-memory files it makes later the database file's mode)."""
    if not path.exists():
        old = os.umask(0o077)
        try:
            path.touch()
        finally:
            os.umask(old)
    path.chmod(0o600)


def _sqlite_file(url: str) -> Path | None:
    """A SQLite ledger's file, its folder made and the file owner-only; None for other databases."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _owner_only(Path(path))
    return Path(path)


def get_engine(url: str, *, connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
               statement_timeout_s: float | None = None) -> Engine:
    """One engine per URL and timeouts. ``connect_timeout_s`` bounds a connection attempt (and the wait
    for a pooled connection); ``statement_timeout_s`` bounds each statement (PostgreSQL), or the wait for
    SQLite's write lock (SQLite; unset: 30 s). Errors never echo SQL parameters (user ids)."""
    key = (url, connect_timeout_s, statement_timeout_s)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            _ENGINES[key] = _create_engine(url, connect_timeout_s=connect_timeout_s,
                                           statement_timeout_s=statement_timeout_s)
        return _ENGINES[key]


def dispose_engines() -> None:
    """Close every engine's pooled connections and forget the engines."""
    with _ENGINES_LOCK:
        for engine in _ENGINES.values():
            engine.dispose()
        _ENGINES.clear()


def _create_engine(url: str, *, connect_timeout_s: int, statement_timeout_s: float | None) -> Engine:
    if url.startswith("sqlite"):
        _sqlite_file(url)
        busy_s = statement_timeout_s if statement_timeout_s is not None else 30.0
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": busy_s},
                               hide_parameters=True)
        event.listen(engine, "connect", _sqlite_pragmas(int(busy_s * 1000)))
        # BEGIN IMMEDIATE: take the write lock up front, so two processes that read then write
        # (gateway and worker) wait for each other instead of failing with "database is locked".
        event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    connect_args: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout_s))}
    if statement_timeout_s is not None:
        options = make_url(url).query.get("options")  # keep what the URL sets (e.g. search_path)
        existing = (options if isinstance(options, str) else " ".join(options or ())).strip()
        timeout = f"-c statement_timeout={max(1, round(statement_timeout_s * 1000))}"
        connect_args["options"] = f"{existing} {timeout}".strip()
    return create_engine(url, pool_pre_ping=True, pool_timeout=connect_timeout_s, connect_args=connect_args,
                         hide_parameters=True)


def checkpoint(url: str) -> None:
    """After a purge: SQLite copies its write-ahead log into the database file and truncates it, so the
    page images written before the purge, which hold the deleted rows, leave the disk (``secure_delete``
    zeroed them in the pages that replace them). A reader still open may keep part of the log until the
    next purge. Other databases: nothing (PostgreSQL's dead rows wait for VACUUM; its WAL is the
    operator's)."""
    if not url.startswith("sqlite"):
        return
    raw = get_engine(url).raw_connection()  # outside any transaction (the engine's begin event opens one)
    try:
        cursor = raw.cursor()
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.close()
    finally:
        raw.close()


def session_factory(url: str, *, connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
                    statement_timeout_s: float | None = None) -> sessionmaker[Session]:
    engine = get_engine(url, connect_timeout_s=connect_timeout_s, statement_timeout_s=statement_timeout_s)
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(url: str, *, connect_timeout_s: int = DEFAULT_CONNECT_TIMEOUT_S,
                  statement_timeout_s: float | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    factory = session_factory(url, connect_timeout_s=connect_timeout_s, statement_timeout_s=statement_timeout_s)
    with factory.begin() as session:
        yield session


def migrations_dir() -> Path:
    """``APA_MIGRATIONS_DIR``, else the source tree's migrations."""
    return get_settings().migrations_dir or SOURCE_MIGRATIONS_DIR


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    folder = migrations_dir()
    if not (folder / "env.py").is_file():
        raise LedgerError(f"migrations not found at {folder} (APA_MIGRATIONS_DIR)")
    cfg = Config()
    cfg.set_main_option("script_location", str(folder))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    _sqlite_file(url)  # Alembic opens its own engine: the file must be owner-only before it creates it
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(url: str) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def require_current(url: str) -> None:
    """Raise unless the ledger's schema is at the newest migration."""
    current, head = current_revision(url), head_revision(url)
    if current != head:
        raise LedgerError(f"the ledger at {redact(url)} is at migration {current}, not {head}: "
                          "run `apa ledger upgrade`")


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)
