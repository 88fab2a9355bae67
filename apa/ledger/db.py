"""Connections and sessions to the ledger, and its Alembic migrations.

SQLite by default (``sqlite:///<APA_HOME>/apa.db``, WAL mode so the gateway and the worker can share
it), PostgreSQL with ``APA_DATABASE_URL=postgresql+psycopg://...``. Tables come only from the
migrations in ``migrations/`` (``apa ledger upgrade``), never from ``create_all``.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from apa.errors import LedgerError

# The source tree's migrations; an installed (non-editable) package, as in the Docker image, names them
# with APA_MIGRATIONS_DIR.
MIGRATIONS_DIR = Path(os.environ.get("APA_MIGRATIONS_DIR") or Path(__file__).resolve().parents[2] / "migrations")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event starts the transactions
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # BEGIN IMMEDIATE: take the write lock up front, so two processes that read then write
        # (gateway and worker) wait for each other instead of failing with "database is locked".
        event.listen(engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    # connect_timeout: a server that accepts but never answers fails the connection instead of hanging it
    return create_engine(url, pool_pre_ping=True, pool_timeout=10, connect_args={"connect_timeout": 5})


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    with session_factory(url).begin() as session:
        yield session


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise LedgerError(f"migrations not found at {MIGRATIONS_DIR}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

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
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
