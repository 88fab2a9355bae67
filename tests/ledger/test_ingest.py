"""Online learning in the ledger: the migration that brings it to a ledger of today with data in it,
pending samples and their triggers, claims and training, and deleting samples no version trained on."""

from datetime import timedelta

from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from ledger import backlog, db, deletions, ingest, retrains
from ledger.models import Interaction, Sample, Shard, utcnow
from service.settings import ServiceSettings


def test_the_migration_upgrades_a_ledger_of_today_with_data_in_it(settings: ServiceSettings) -> None:
    url = settings.ledger_url
    with db.session_scope(url) as session:
        counts = [session.scalar(text(f"SELECT count(*) FROM {t}"))
                  for t in ("interactions", "samples", "sample_interactions", "adapter_versions", "shards")]
    db.downgrade(url, "0002")  # the ledger as it was before this migration, its data kept
    columns = {c["name"] for c in inspect(db.get_engine(url)).get_columns("samples")}
    assert "prompt" not in columns and "ingestion_requests" not in inspect(db.get_engine(url)).get_table_names()
    db.dispose_engines()
    db.upgrade(url)
    assert db.current_revision(url) == db.head_revision(url)
    with db.session_scope(url) as session:
        assert [session.scalar(text(f"SELECT count(*) FROM {t}"))
                for t in ("interactions", "samples", "sample_interactions", "adapter_versions", "shards")] == counts
        assert session.scalar(select(Sample).where(Sample.ingested_at.is_not(None))) is None
        assert all(s.centre is None and s.ingest_error is None for s in session.scalars(select(Shard)))
        assert backlog.pending(session=session) == {}


def _ingested(session: Session, sample_id: str, shard: int, *, at_s_ago: float = 0.0) -> None:
    user, item, ts = sample_id.split(":")
    interaction = Interaction(key=sample_id, user_id=user, item_id=item, rating=5.0, timestamp=int(ts))
    session.add(interaction)
    session.flush()
    ingest.record(session=session, request=ingest.claim_request(
        session=session, user_id=user, key=b"k", interactions=[], idempotency_key=None, token_hmac=None)[0],
        user_id=user, interactions=[], answer={"accepted": 1, "duplicates": 0, "samples": {}, "pending_shards": []},
        samples=[ingest.NewSample(sample_id=sample_id, user_id=user, split="train", shard=shard, label=1,
                                  content={"sample_id": sample_id}, prompt=f"prompt {sample_id}",
                                  history_prompt=f"history {sample_id}", interaction_keys=[sample_id])])
    if at_s_ago:
        session.execute(Sample.__table__.update().where(Sample.sample_id == sample_id)
                        .values(ingested_at=utcnow() - timedelta(seconds=at_s_ago)))


def test_a_shard_is_due_by_count_or_by_age(session: Session) -> None:
    _ingested(session, "u1:6:1000", 0)
    _ingested(session, "u1:7:1001", 0)
    _ingested(session, "u2:3:1002", 1, at_s_ago=120)
    pending = backlog.pending(session=session)
    assert {k: p.samples for k, p in pending.items()} == {0: 2, 1: 1}
    assert backlog.due_shards(session=session, min_samples=2, max_delay_s=3600) == [0]
    assert backlog.due_shards(session=session, min_samples=3, max_delay_s=60) == [1]
    assert backlog.due_shards(session=session, min_samples=3, max_delay_s=3600) == []
    due = backlog.due_at(pending[1], min_samples=3, max_delay_s=3600)
    assert due is not None and pending[1].oldest is not None and due == pending[1].oldest + timedelta(hours=1)
    session.get(Shard, 0).ingest_error = "gate"  # type: ignore[union-attr]
    assert backlog.due_shards(session=session, min_samples=1, max_delay_s=3600) == [1], "waits for an admin"


def test_a_retrain_claims_pending_samples_and_its_publication_trains_them(session: Session) -> None:
    _ingested(session, "u1:6:1000", 0)
    snapshot = retrains.begin_retrain(session=session, shard=0)
    assert snapshot is not None and snapshot.claimed == ["u1:6:1000"]
    assert "u1:6:1000" in snapshot.sample_ids and [r.sample_id for r in snapshot.ingested] == ["u1:6:1000"]
    assert session.get(Shard, 0).state == "serving", "ingestion alone: the old version serves on"  # type: ignore[union-attr]
    assert retrains.begin_retrain(session=session, shard=1) is None, "nothing pending, nothing deleted"
    backlog.mark_trained(session=session, sample_ids=snapshot.claimed, version=2)
    assert backlog.pending(session=session) == {}


def test_ingestion_retrains_give_way_to_an_open_deletion(session: Session, key: bytes) -> None:
    _ingested(session, "u1:6:1000", 0)
    deletions.request_deletion(session=session, user_id="u4", item_ids=["2"], key=key)  # in shard 1 only
    assert retrains.begin_retrain(session=session, shard=0) is None
    assert retrains.begin_retrain(session=session, shard=1) is not None


def test_deleting_a_pending_sample_needs_no_retrain_but_a_claimed_one_does(session: Session, key: bytes) -> None:
    _ingested(session, "u3:1:1000", 0)
    outcome = deletions.request_deletion(session=session, user_id="u3", item_ids=["1"], key=key)
    assert outcome.request.affected_shards == [] and outcome.request.status == "completed"
    assert outcome.request.certificate is not None
    assert outcome.request.certificate["untrained_samples_removed"] == 1
    assert outcome.request.certificate["shards"] == []

    _ingested(session, "u3:2:1001", 1)
    assert retrains.begin_retrain(session=session, shard=1) is not None  # claimed: a version may hold it now
    claimed = deletions.request_deletion(session=session, user_id="u3", item_ids=["2"], key=key)
    assert claimed.request.affected_shards == [1] and claimed.request.status == "quarantined"


def test_a_retrain_in_flight_may_choose_its_epoch_on_any_live_validation_sample(session: Session) -> None:
    """With no serving version naming a selection, deleting a validation sample reaches only the shards
    retraining now: an ingestion retrain that claimed its samples, a deletion's retrain."""
    for shard in session.scalars(select(Shard)):
        shard.serving_version = None
    assert deletions.chose_epoch_on(session=session, sample_ids={"u3:5:220"}) == set()
    _ingested(session, "u3:2:1001", 1)
    assert retrains.begin_retrain(session=session, shard=1) is not None  # claims it; the shard still serves
    assert deletions.chose_epoch_on(session=session, sample_ids={"u3:5:220"}) == {1}
    session.get(Shard, 0).state = "retraining"  # type: ignore[union-attr]
    assert deletions.chose_epoch_on(session=session, sample_ids={"u3:5:220"}) == {0, 1}
    assert deletions.chose_epoch_on(session=session, sample_ids=set()) == set(), "no validation sample deleted"
