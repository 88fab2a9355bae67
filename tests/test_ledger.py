"""Migrations up and down on SQLite and PostgreSQL; the ledger's import and what it refuses."""

from pathlib import Path

import pytest
from sqlalchemy import inspect

from apa.errors import LedgerError
from apa.hashing import hmac_hex
from ledger import catalog, db, run_import
from ledger.models import Base
from tests.conftest import record_run, service_settings


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


def test_import_is_idempotent_and_one_ledger_serves_one_run(
    ledger_url: str, service_home: Path, redis_prefix: str, tiny_model_dir: Path, tmp_path: Path,
) -> None:
    from worker.record import import_run

    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir)
    record_run(settings)
    with db.session_scope(ledger_url) as session:
        again = import_run(session, settings.runs_dir / "tiny", settings)
        views = catalog.shard_views(session=session)
        history = catalog.live_history(session=session, user_id="u1")
    assert (again.created, again.versions_added) == (False, 0)
    assert [(v.shard, v.state, v.version) for v in views] == [(0, "serving", 1), (1, "serving", 1)]
    assert [item for item, _ in history] == ["1", "4", "10", "2", "3", "5"]  # (timestamp, item_id) order
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text("{}")
    with pytest.raises(LedgerError, match="already serves"), db.session_scope(ledger_url) as session:
        run_import.import_run(session=session, run_path=other, dataset=None, splits={}, shard_of={},  # type: ignore[arg-type]
                              config={"shards": 2}, base_model_name="x", base_model_sha256="0" * 64, versions=[],
                              key=b"k")


def test_hmacs_are_keyed() -> None:
    a = hmac_hex(b"key-1", "interaction", "u1:1:100")
    assert a == hmac_hex(b"key-1", "interaction", "u1:1:100")
    assert a != hmac_hex(b"key-2", "interaction", "u1:1:100")
    assert "u1" not in a and len(a) == 64


def test_cli_ledger_commands_and_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from apa.cli import app
    from apa.settings import get_settings

    monkeypatch.setenv("APA_HOME", str(tmp_path))
    monkeypatch.delenv("APA_DATABASE_URL", raising=False)
    monkeypatch.delenv("APA_ADMIN_TOKEN", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        up = runner.invoke(app, ["ledger", "upgrade"])
        assert up.exit_code == 0 and "at migration 0002" in up.output
        assert (tmp_path / "apa.db").is_file()
        missing = runner.invoke(app, ["audit", "no-such-request"])
        assert missing.exit_code == 1 and "no deletion request" in missing.output
        down = runner.invoke(app, ["ledger", "downgrade"])
        assert down.exit_code == 0 and "at migration None" in down.output
        no_token = runner.invoke(app, ["serve"])
        assert no_token.exit_code == 1 and "APA_ADMIN_TOKEN" in no_token.output
    finally:
        get_settings.cache_clear()
