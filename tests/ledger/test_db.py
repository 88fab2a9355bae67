"""The ledger's connections and migrations (ledger.db) on SQLite and PostgreSQL, and its CLI commands."""

from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from ledger import db
from ledger.errors import LedgerError
from ledger.models import AuditEntry, Base


def test_migrations_create_everything_and_downgrade_removes_it(ledger_url: str) -> None:
    db.upgrade(ledger_url)
    assert db.current_revision(ledger_url) == db.head_revision(ledger_url)
    db.require_current(ledger_url)
    tables = set(inspect(db.get_engine(ledger_url)).get_table_names())
    assert set(Base.metadata.tables) <= tables
    fks = inspect(db.get_engine(ledger_url)).get_foreign_keys("interactions")
    assert all(fk["name"] and fk["name"].startswith("fk_") for fk in fks), "constraints are named"
    db.downgrade(ledger_url)
    assert not set(Base.metadata.tables) & set(inspect(db.get_engine(ledger_url)).get_table_names())
    with pytest.raises(LedgerError, match="apa ledger upgrade"):
        db.require_current(ledger_url)
    db.upgrade(ledger_url)
    assert db.current_revision(ledger_url) == db.head_revision(ledger_url)


def test_a_session_scope_commits_on_success_and_rolls_back_on_error(ledger_url: str) -> None:
    db.upgrade(ledger_url)
    with db.session_scope(ledger_url) as session:
        session.add(AuditEntry(actor="test", action="kept", subject="s"))
    with pytest.raises(RuntimeError), db.session_scope(ledger_url) as session:
        session.add(AuditEntry(actor="test", action="dropped", subject="s"))
        session.flush()
        raise RuntimeError("boom")
    with db.session_scope(ledger_url) as session:
        assert list(session.scalars(select(AuditEntry.action))) == ["kept"]
    assert db.get_engine(ledger_url) is db.get_engine(ledger_url), "one engine per URL and timeouts"
    assert db.get_engine(ledger_url) is not db.get_engine(ledger_url, statement_timeout_s=5)


def test_redact_hides_the_password_and_a_sqlite_ledger_is_its_owners_only(tmp_path: Path) -> None:
    assert db.redact("postgresql+psycopg://apa:secret@db:5432/apa") == "postgresql+psycopg://apa:***@db:5432/apa"
    path = tmp_path / "private" / "apa.db"
    db.get_engine(f"sqlite:///{path}")  # makes the folder and the file, before any connection
    assert path.stat().st_mode & 0o777 == 0o600
    db.upgrade(f"sqlite:///{path}")
    assert path.stat().st_mode & 0o777 == 0o600
    fresh = tmp_path / "fresh" / "apa.db"
    db.upgrade(f"sqlite:///{fresh}")  # no engine before: Alembic's own makes the file
    assert fresh.stat().st_mode & 0o777 == 0o600


def test_cli_ledger_commands_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from apa.settings import get_settings
    from cli.main import app

    monkeypatch.setenv("APA_HOME", str(tmp_path))
    monkeypatch.delenv("APA_DATABASE_URL", raising=False)
    monkeypatch.delenv("APA_ADMIN_TOKEN", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["ledger", "upgrade"])
        assert up.exit_code == 0 and "at migration 0004" in up.output
        assert (tmp_path / "apa.db").is_file()
        no_token = runner.invoke(app, ["serve"])  # a migrated ledger is not enough to serve
        assert no_token.exit_code == 1 and "APA_ADMIN_TOKEN" in no_token.output
        down = runner.invoke(app, ["ledger", "downgrade"])
        assert down.exit_code == 0 and "at migration None" in down.output
    finally:
        get_settings.cache_clear()


def test_the_migrations_folder_comes_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apa.settings import get_settings

    assert db.migrations_dir() == db.SOURCE_MIGRATIONS_DIR  # the source tree's by default
    monkeypatch.setenv("APA_MIGRATIONS_DIR", str(tmp_path / "elsewhere"))
    get_settings.cache_clear()
    try:
        assert db.migrations_dir() == tmp_path / "elsewhere"
        with pytest.raises(LedgerError, match=r"migrations not found at .*elsewhere"):
            db.alembic_config(f"sqlite:///{tmp_path / 'l.db'}")
    finally:
        monkeypatch.delenv("APA_MIGRATIONS_DIR")
        get_settings.cache_clear()
