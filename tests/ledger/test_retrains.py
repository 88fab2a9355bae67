"""Retraining a shard (ledger.retrains) on the tiny run, on SQLite and PostgreSQL.

A shard is dirty while ``dirty_seq > clean_seq``: each deletion reaching it bumps ``dirty_seq``, a
published retrain sets ``clean_seq`` to the seq its snapshot was taken at. Retrained versions are fake
folders holding a manifest (``fake_version``): ``complete`` reads only that. u1's last rating (item 5)
is in one training sample (u1:5:500, shard 0); their first (item 1) in one of each shard.
"""

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger import catalog, deletions, retrains
from ledger.errors import NothingToRetrain, ShardNotFound
from ledger.models import AdapterVersion, AuditEntry, Shard
from service.settings import ServiceSettings
from tests.ledger.conftest import SHARD_SAMPLES, VALID_SAMPLES, fake_version


def _shard(session: Session, k: int) -> tuple[str, int | None, int, int]:
    row = session.get(Shard, k)
    assert row is not None
    return row.state, row.serving_version, row.dirty_seq, row.clean_seq


def _statuses(session: Session, request_id: str) -> list[str]:
    return [e.status for e in deletions.status_history(session=session, request_id=request_id)]


def test_dirty_shards_are_those_a_deletion_reached_failed_ones_on_request(session: Session, key: bytes) -> None:
    assert retrains.dirty_shards(session=session) == []
    deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key)
    assert retrains.dirty_shards(session=session) == [0]
    deletions.request_deletion(session=session, user_id="u4", item_ids=["2"], key=key)  # u4:2:380, shard 1
    assert retrains.dirty_shards(session=session) == [0, 1]
    retrains.fail_retrain(session=session, shard=1, error="boom")
    assert retrains.dirty_shards(session=session) == [0]
    assert retrains.dirty_shards(session=session, include_failed=True) == [0, 1]


def test_begin_retrain_snapshots_the_live_samples_and_marks_its_requests_retraining(
    session: Session, key: bytes, settings: ServiceSettings,
) -> None:
    assert retrains.begin_retrain(session=session, shard=0) is None, "a clean shard has nothing to retrain"
    with pytest.raises(ShardNotFound, match="no shard 7"):
        retrains.begin_retrain(session=session, shard=7)
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    snapshot = retrains.begin_retrain(session=session, shard=0)
    assert snapshot == retrains.RetrainSnapshot(
        shard=0, seq=1, sample_ids=SHARD_SAMPLES[0][1:], valid_ids=VALID_SAMPLES, old_version=1,
        run_path=(settings.runs_dir / "tiny").resolve())
    assert _shard(session, 0) == ("retraining", 1, 1, 0)
    assert (request.status, _statuses(session, request.id)) == ("retraining", ["quarantined", "retraining"])


def test_a_retrain_left_unfinished_is_begun_again_and_a_failed_shard_is_not(session: Session, key: bytes) -> None:
    """A worker that died mid-retrain leaves the shard ``retraining`` and dirty: the next job claims it again."""
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    first = retrains.begin_retrain(session=session, shard=0)
    again = retrains.begin_retrain(session=session, shard=0)
    assert first == again and retrains.dirty_shards(session=session) == [0]
    assert _statuses(session, request.id) == ["quarantined", "retraining"], "no second event"
    retrains.fail_retrain(session=session, shard=0, error="boom")
    assert retrains.begin_retrain(session=session, shard=0) is None, "a failed shard waits for an admin"


def test_publish_serves_the_new_version_and_completes_the_request_with_its_certificate(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    v1 = {v.shard: v for v in catalog.shard_views(session=session)}[0]
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    snapshot = retrains.begin_retrain(session=session, shard=0)
    assert snapshot is not None
    record = fake_version(tmp_path / "v2", shard=0, version=2, samples=[["u2:1:170"], ["u2:2:180"], ["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key) == [request.id]
    assert _shard(session, 0) == ("serving", 2, 1, 1)
    versions = session.scalars(select(AdapterVersion).where(AdapterVersion.shard == 0)
                               .order_by(AdapterVersion.version)).all()
    assert [(v.version, v.covers_seq, v.retired_at is not None, v.n_samples) for v in versions] == \
        [(1, 0, True, 4), (2, 1, False, 3)]
    assert request.status == "completed" and request.completed_at is not None
    assert _statuses(session, request.id) == ["quarantined", "retraining", "completed"]
    certificate = request.certificate
    assert certificate is not None
    assert (certificate["violations"], certificate["serving_manifests_checked"]) == (0, 2)
    assert certificate["shards"] == [{"shard": 0, "old_version": 1, "new_version": 2,
                                      "old_manifest_sha256": None,
                                      "old_manifest_hmac": hmac_hex(key, "manifest", str(v1.manifest_sha256)),
                                      "new_manifest_sha256": record.manifest_sha256,
                                      "new_adapter_sha256": record.metrics.get("adapter_sha256"),
                                      "verify": record.metrics.get("verify")}]
    assert retrains.pending_requests(session=session, shard=0) == []
    audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "shard.publish")).one()
    assert (audit.subject, audit.detail["version"], audit.detail["state"]) == ("shard-0", 2, "serving")


def test_a_deletion_during_the_retrain_keeps_the_shard_quarantined_for_one_more(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    snapshot = retrains.begin_retrain(session=session, shard=0)
    second = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key).request  # seq 2
    assert snapshot is not None and snapshot.seq == 1
    assert retrains.pending_requests(session=session, shard=0) == [first, second]
    assert retrains.pending_requests(session=session, shard=0, up_to=1) == [first]
    v2 = fake_version(tmp_path / "v2", shard=0, version=2, samples=[["u2:2:180"], ["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=snapshot, record=v2, key=key) == [first.id]
    assert _shard(session, 0) == ("quarantined", 2, 2, 1)
    assert (second.status, retrains.dirty_shards(session=session)) == ("quarantined", [0])
    later = retrains.begin_retrain(session=session, shard=0)
    assert later is not None and (later.seq, later.old_version) == (2, 2)
    assert later.sample_ids == ["u2:1:170", "u4:11:370"]
    v3 = fake_version(tmp_path / "v3", shard=0, version=3, samples=[["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=later, record=v3, key=key) == [second.id]
    assert _shard(session, 0) == ("serving", 3, 2, 2)


def test_a_stale_snapshot_published_late_never_replaces_a_newer_version(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    """Worker A snapshots seq 1 and stalls; its lock is freed, worker B retrains seq 2 and publishes v3.
    A's v2 (trained on u2:2:180, deleted at seq 2) arrives last: it must not serve again."""
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    stale = retrains.begin_retrain(session=session, shard=0)
    second = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key).request
    fresh = retrains.begin_retrain(session=session, shard=0)
    assert stale is not None and fresh is not None and (stale.seq, fresh.seq) == (1, 2)
    v3 = fake_version(tmp_path / "v3", shard=0, version=3, samples=[["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=fresh, record=v3, key=key) == [first.id, second.id]
    v2 = fake_version(tmp_path / "v2", shard=0, version=2, samples=[["u2:2:180"], ["u4:11:370"]])
    assert retrains.publish_version(session=session, snapshot=stale, record=v2, key=key) == []
    assert _shard(session, 0) == ("serving", 3, 2, 2)
    assert [v.version for v in catalog.shard_views(session=session)] == [3, 1]
    late = session.scalars(select(AdapterVersion).where(AdapterVersion.shard == 0, AdapterVersion.version == 2)).one()
    assert late.retired_at is not None, "recorded (so a purge finds its folder), never served"


def test_a_request_spanning_two_shards_completes_when_the_second_publishes(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key).request
    for shard, expected in [(0, []), (1, [request.id])]:
        snapshot = retrains.begin_retrain(session=session, shard=shard)
        assert snapshot is not None
        keep = [[s] for s in snapshot.sample_ids]  # the live samples, none holding u1:1:100
        record = fake_version(tmp_path / f"s{shard}", shard=shard, version=2, samples=keep)
        assert retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key) == expected
    assert request.status == "completed"
    assert request.certificate is not None
    assert [(s["shard"], s["old_version"], s["new_version"]) for s in request.certificate["shards"]] == \
        [(0, 1, 2), (1, 1, 2)]


def test_a_failed_retrain_fails_its_requests_until_an_admin_asks_again(
    session: Session, key: bytes, tmp_path: Path,
) -> None:
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key).request
    retrains.begin_retrain(session=session, shard=1)
    assert retrains.fail_retrain(session=session, shard=1, error="validation gate: AUC fell") == [request.id]
    assert _shard(session, 1) == ("failed", 1, 1, 0), "never rolled back, never serving"
    assert (request.status, request.error) == ("failed", "shard 1: validation gate: AUC fell")
    snapshot = retrains.begin_retrain(session=session, shard=0)
    assert snapshot is not None
    record = fake_version(tmp_path / "s0", shard=0, version=2, samples=[])
    assert retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key) == []
    assert request.status == "failed", "shard 1 still holds the deleted data"
    retrains.request_retrain(session=session, shard=1)
    assert _shard(session, 1) == ("quarantined", 1, 1, 0)
    assert (request.status, request.error) == ("quarantined", None)
    assert _statuses(session, request.id)[-2:] == ["failed", "quarantined"]
    snapshot = retrains.begin_retrain(session=session, shard=1)
    assert snapshot is not None
    record = fake_version(tmp_path / "s1", shard=1, version=2, samples=[])
    assert retrains.publish_version(session=session, snapshot=snapshot, record=record, key=key) == [request.id]


def test_request_retrain_and_fail_retrain_refuse_a_clean_or_unknown_shard(session: Session, key: bytes) -> None:
    with pytest.raises(NothingToRetrain, match="shard 0"):
        retrains.request_retrain(session=session, shard=0)
    with pytest.raises(ShardNotFound, match="no shard 9"):
        retrains.request_retrain(session=session, shard=9)
    with pytest.raises(ShardNotFound, match="no shard 9"):
        retrains.fail_retrain(session=session, shard=9, error="x")
    deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key)
    retrains.request_retrain(session=session, shard=0, actor="admin")  # quarantined: nothing changes
    assert _shard(session, 0) == ("quarantined", 1, 1, 0)
    audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "shard.retrain.request")).one()
    assert (audit.actor, audit.subject) == ("admin", "shard-0")
