"""Purging what a completed deletion removed (ledger.purges) on the tiny run, on SQLite and PostgreSQL.

The tombstoned rows go once the retrain that forgot them serves; the versions trained on them are
marked purged (apa.purge removes their folders); the HMACs in ``forgotten`` and the certificate stay.
"""

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger import catalog, db, deletions, purges, retrains
from ledger.errors import DeletionNotFound
from ledger.models import (
    AdapterVersion,
    AuditEntry,
    Base,
    DeletionRequest,
    Forgotten,
    Interaction,
    Sample,
    SampleInteraction,
)
from service.settings import ServiceSettings
from tests.conftest import RATINGS
from tests.ledger.conftest import fake_version


def _count(session: Session, table: type) -> int:
    return session.scalar(select(func.count()).select_from(table)) or 0


def _retrain(session: Session, key: bytes, folder: Path, shard: int, version: int) -> list[str]:
    snapshot = retrains.begin_retrain(session=session, shard=shard)
    assert snapshot is not None
    record = fake_version(folder / f"shard-{shard}-v{version}", shard=shard, version=version,
                          samples=[[s] for s in snapshot.sample_ids])
    return retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key)


def _version_path(session: Session, shard: int, version: int) -> Path:
    row = session.scalars(select(AdapterVersion).where(AdapterVersion.shard == shard,
                                                       AdapterVersion.version == version)).one()
    return Path(row.path)


def test_only_completed_unpurged_requests_are_pending_oldest_first(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    assert purges.pending_purges(session=session) == []
    quarantined = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    u3 = deletions.request_deletion(session=session, user_id="u3", item_ids=["10"], key=key).request  # no shard
    assert purges.pending_purges(session=session) == [u3.id]
    assert _retrain(session, key, tmp_path, 0, 2) == [quarantined.id]
    assert purges.pending_purges(session=session) == [quarantined.id, u3.id]
    purges.finish_purge(session=session, plan=purges.purge_plan(session=session, request_id=u3.id))
    assert purges.pending_purges(session=session) == [quarantined.id]


def test_plan_of_a_request_that_reached_no_shard(session: Session, key: bytes, settings: ServiceSettings) -> None:
    request = deletions.request_deletion(session=session, user_id="u3", item_ids=["10"], key=key).request
    plan = purges.purge_plan(session=session, request_id=request.id)
    assert plan == purges.PurgePlan(
        request_id=request.id, sample_ids=["u3:10:270", "u3:11:280"],
        superseded=[], run_path=(settings.runs_dir / "tiny").resolve(), interaction_hmacs=request.deleted_hmacs)
    assert len(plan.interaction_hmacs) == 1
    with pytest.raises(DeletionNotFound):
        purges.purge_plan(session=session, request_id="no-such-id")


def test_finish_purge_deletes_the_rows_and_marks_the_superseded_version(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    """u1 deletes item 1: 1 interaction, 4 samples (2 train, 2 valid), both shards retrained to v2."""
    interactions, samples = _count(session, Interaction), _count(session, Sample)
    assert (interactions, samples) == (sum(len(r) for r in RATINGS.values()), 24)
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key).request
    assert _retrain(session, key, tmp_path, 0, 2) == []
    assert _retrain(session, key, tmp_path, 1, 2) == [request.id]
    plan = purges.purge_plan(session=session, request_id=request.id)
    assert plan.sample_ids == ["u1:2:300", "u1:3:400", "u1:4:200", "u1:5:500"]
    assert plan.superseded == sorted([_version_path(session, 0, 1), _version_path(session, 1, 1)])
    assert plan.interaction_hmacs == [hmac_hex(key, "interaction", "u1:1:100")]
    purges.finish_purge(session=session, plan=plan)
    assert (_count(session, Interaction), _count(session, Sample)) == (interactions - 1, samples - 4)
    assert session.scalar(select(func.count()).select_from(SampleInteraction)
                          .where(SampleInteraction.sample_id.like("u1:%"))) == 0
    assert [(v.shard, v.version) for v in session.scalars(select(AdapterVersion).where(
        AdapterVersion.purged_at.is_not(None)).order_by(AdapterVersion.shard))] == [(0, 1), (1, 1)]
    assert request.purged_at is not None
    assert purges.pending_purges(session=session) == []
    assert _count(session, Forgotten) == 5, "1 interaction and 4 sample HMACs stay as proof"
    assert [i for i, _ in catalog.live_history(session=session, user_id="u1")] == ["4", "10", "2", "3", "5"]
    audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "deletion.purged")).one()
    assert (audit.subject, audit.detail) == (request.id, {"interaction_rows": 1, "sample_rows": 4,
                                                          "adapter_versions": 2})
    purges.finish_purge(session=session, plan=plan)  # a purge job run twice finds nothing left
    assert (_count(session, Interaction), _count(session, Sample)) == (interactions - 1, samples - 4)


def test_each_request_purges_the_versions_before_its_own_retrain(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    """Two deletions on shard 0, each retrained in turn (v2, then v3): the first supersedes v1, the second v2."""
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    assert _retrain(session, key, tmp_path, 0, 2) == [first.id]
    second = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key).request
    assert _retrain(session, key, tmp_path, 0, 3) == [second.id]
    plan = purges.purge_plan(session=session, request_id=first.id)
    assert plan.superseded == [_version_path(session, 0, 1)]
    purges.finish_purge(session=session, plan=plan)
    assert purges.purge_plan(session=session, request_id=second.id).superseded == [_version_path(session, 0, 2)]


def test_a_stale_version_published_late_is_purged_whatever_its_number(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    """Worker A snapshots seq 1 and stalls; worker B retrains seq 2 and publishes v3; A's version arrives
    last as v4 (the next free number), trained on u2's deleted sample: the second request purges it."""
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    stale = retrains.begin_retrain(session=session, shard=0)
    second = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key).request
    fresh = retrains.begin_retrain(session=session, shard=0)
    assert stale is not None and fresh is not None
    v3 = fake_version(tmp_path / "v3", shard=0, version=3, samples=[["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=fresh, record=v3, key=key) == [first.id, second.id]
    v4 = fake_version(tmp_path / "v4", shard=0, version=4, samples=[["u2:2:180"], ["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=stale, record=v4, key=key) == []
    v1 = _version_path(session, 0, 1)
    assert purges.purge_plan(session=session, request_id=first.id).superseded == [v1]  # v4 holds no u1 data
    assert purges.purge_plan(session=session, request_id=second.id).superseded == sorted(
        [v1, _version_path(session, 0, 4)])


def _ledger_text(session: Session) -> str:
    """Every value of every row of every table, as text."""
    values = []
    for table in Base.metadata.sorted_tables:
        for row in session.execute(select(table)):
            values.extend(json.dumps(v, default=str) for v in row)
    return "\n".join(values)


def test_no_plain_hash_of_a_purged_version_remains(session: Session, key: bytes, tmp_path: Path) -> None:
    """Two deletions on shard 0 (v1 -> v2 -> v3), both purged. v1 and v2 held deleted data: trying each
    possible sample against a plain hash of their manifests (or weights) would find it. Only HMACs of the
    old versions stay; the first certificate forgets the v2 it named as new once the second purges v2."""
    v1 = {v.shard: v for v in catalog.shard_views(session=session)}[0]
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    assert _retrain(session, key, tmp_path, 0, 2) == [first.id]
    purges.finish_purge(session=session, plan=purges.purge_plan(session=session, request_id=first.id))
    v2 = session.scalars(select(AdapterVersion).where(AdapterVersion.shard == 0, AdapterVersion.version == 2)).one()
    v2_hash = str(v2.manifest_sha256)
    v2.metrics = {**v2.metrics, "adapter_sha256": "ad" * 32}
    certificate = first.certificate
    assert certificate is not None
    first.certificate = {**certificate, "shards": [{**certificate["shards"][0], "new_adapter_sha256": "ad" * 32}]}
    assert v2_hash in _ledger_text(session), "a serving version keeps its hash"
    second = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key).request
    assert _retrain(session, key, tmp_path, 0, 3) == [second.id]
    purges.finish_purge(session=session, plan=purges.purge_plan(session=session, request_id=second.id))
    text = _ledger_text(session)
    for plain in (str(v1.manifest_sha256), v2_hash, "ad" * 32):
        assert plain not in text
    assert hmac_hex(key, "manifest", str(v1.manifest_sha256)) in text
    assert hmac_hex(key, "manifest", v2_hash) in text
    entry = (first.certificate or {})["shards"][0]
    assert (entry["old_manifest_sha256"], entry["new_manifest_sha256"], entry["new_adapter_sha256"]) == \
        (None, None, None)
    assert entry["old_manifest_hmac"] == hmac_hex(key, "manifest", str(v1.manifest_sha256))
    assert (second.certificate or {})["shards"][0]["new_manifest_sha256"] in text, "v3 serves: its hash stays"
    purged = session.scalars(select(AdapterVersion).where(AdapterVersion.purged_at.is_not(None))
                             .order_by(AdapterVersion.version)).all()
    assert [(v.version, v.manifest_sha256, v.metrics) for v in purged] == [(1, None, {}), (2, None, {})]


def test_migration_0004_drops_the_plain_hashes_a_ledger_of_0003_kept(settings: ServiceSettings) -> None:
    """A 0003 ledger after a purged deletion, as it was: the purged v1's plain manifest hash in its row, in
    deletion_shards and in the certificate (old and as another request's new version), and in the audit
    log. The migration cannot know APA_HMAC_KEY: it drops them."""
    url = settings.ledger_url
    db.downgrade(url, "0003")
    sha, adapter = "ab" * 32, "cd" * 32
    entry = {"shard": 0, "old_version": 1, "new_version": 2, "old_manifest_sha256": sha,
             "new_manifest_sha256": "ef" * 32, "new_adapter_sha256": "12" * 32}
    earlier = {**entry, "old_version": None, "new_version": 1, "old_manifest_sha256": None,
               "new_manifest_sha256": sha, "new_adapter_sha256": adapter}
    with db.session_scope(url) as session:
        session.execute(text("UPDATE adapter_versions SET manifest_sha256 = :sha, metrics = :metrics, "
                             "purged_at = CURRENT_TIMESTAMP WHERE shard = 0 AND version = 1"),
                        {"sha": sha, "metrics": json.dumps({"adapter_sha256": adapter, "valid_auc": 0.5})})
        for request_id, part in (("r-old", earlier), ("r-new", entry)):
            session.execute(text("INSERT INTO deletion_requests (id, subject_hmac, status, affected_shards, "
                                 "interactions_removed, samples_removed, deleted_hmacs, created_at, certificate) "
                                 "VALUES (:id, 'x', 'completed', '[0]', 1, 1, '[]', CURRENT_TIMESTAMP, :cert)"),
                            {"id": request_id, "cert": json.dumps({"request_id": request_id, "shards": [part]})})
            session.execute(text("INSERT INTO deletion_shards (request_id, shard, seq, old_version, "
                                 "old_manifest_sha256, new_version, new_manifest_sha256) "
                                 "VALUES (:id, 0, 1, :old, :old_sha, :new, :new_sha)"),
                            {"id": request_id, "old": part["old_version"], "old_sha": part["old_manifest_sha256"],
                             "new": part["new_version"], "new_sha": part["new_manifest_sha256"]})
        session.execute(text("INSERT INTO audit_log (at, actor, action, subject, detail) VALUES "
                             "(CURRENT_TIMESTAMP, 'worker', 'shard.publish', 'shard-0', :detail)"),
                        {"detail": json.dumps({"version": 1, "manifest_sha256": sha, "state": "serving"})})
    db.dispose_engines()
    db.upgrade(url)
    with db.session_scope(url) as session:
        everything = _ledger_text(session)
        assert sha not in everything and adapter not in everything
        assert "ef" * 32 in everything, "v2 was not purged: its hash stays"
        v1 = session.scalars(select(AdapterVersion).where(AdapterVersion.shard == 0,
                                                          AdapterVersion.version == 1)).one()
        assert (v1.manifest_sha256, v1.metrics) == (None, {})
        certificate = session.get(DeletionRequest, "r-new").certificate  # type: ignore[union-attr]
        assert certificate["shards"][0]["old_manifest_sha256"] is None
        assert certificate["shards"][0]["old_manifest_hmac"] is None
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "shard.publish")).one()
        assert audit.detail == {"version": 1, "state": "serving"}
