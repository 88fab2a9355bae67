"""``apa audit``'s report of one deletion (ledger.audit), on SQLite and PostgreSQL."""

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from ledger import audit, deletions, purges, retrains
from ledger.errors import DeletionNotFound
from service.settings import ServiceSettings
from tests.ledger.conftest import fake_version


def test_the_report_follows_a_deletion_from_request_to_purge_and_names_no_user(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    snapshot = retrains.begin_retrain(session=session, shard=0)
    assert snapshot is not None
    record = fake_version(tmp_path / "v2", shard=0, version=2, samples=[[s] for s in snapshot.sample_ids])
    retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key)
    purges.finish_purge(session=session, plan=purges.purge_plan(session=session, request_id=request.id))
    report = audit.deletion_report(session=session, request_id=request.id)
    assert {k: report[k] for k in ("request_id", "status", "affected_shards", "error", "certificate")} == \
        {"request_id": request.id, "status": "completed", "affected_shards": [0], "error": None,
         "certificate": request.certificate}
    assert [h["status"] for h in report["history"]] == ["quarantined", "retraining", "completed"]
    assert [e["action"] for e in report["audit_log"]] == ["deletion.request", "deletion.completed", "deletion.purged"]
    assert [e["actor"] for e in report["audit_log"]] == ["api", "ledger", "worker"]
    times = [report["created_at"], report["completed_at"], report["purged_at"], *(h["at"] for h in report["history"])]
    assert all(t is not None and t.utcoffset() == timedelta(0) for t in times), "every time is UTC"
    text = json.dumps(report, default=str)
    assert "u1" not in text and "u1:5:500" not in text, "the report holds HMACs, never the user's data"


def test_the_report_of_an_open_request_and_of_an_unknown_one(session: Session, key: bytes) -> None:
    request = deletions.request_deletion(session=session, user_id="u4", item_ids=["2"], key=key).request
    report = audit.deletion_report(session=session, request_id=request.id)
    assert (report["status"], report["affected_shards"], report["completed_at"], report["certificate"]) == \
        ("quarantined", [1], None, None)
    assert [e["detail"] for e in report["audit_log"]] == [{"affected_shards": [1], "interactions": 1, "samples": 1}]
    with pytest.raises(DeletionNotFound, match="no-such-request"):
        audit.deletion_report(session=session, request_id="no-such-request")


def test_cli_audit_prints_the_report_or_a_clear_error(
    settings: ServiceSettings, key: bytes, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from apa.settings import get_settings
    from cli.main import app
    from ledger import db

    with db.session_scope(settings.ledger_url) as session:
        request_id = deletions.request_deletion(session=session, user_id="u3", item_ids=["10"], key=key).request.id
    monkeypatch.setenv("APA_HOME", str(settings.home))
    monkeypatch.setenv("APA_DATABASE_URL", settings.ledger_url)
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        found = runner.invoke(app, ["audit", request_id])
        missing = runner.invoke(app, ["audit", "no-such-request"])
    finally:
        get_settings.cache_clear()
    assert found.exit_code == 0
    printed = json.loads(found.output)
    assert (printed["request_id"], printed["status"], printed["certificate"]["interactions_removed"]) == \
        (request_id, "completed", 1)  # u3's item 10 is in test samples only
    assert missing.exit_code == 1 and "no deletion request" in missing.output
