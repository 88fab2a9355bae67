"""Deletion requests (ledger.deletions) on the tiny run, on SQLite and PostgreSQL.

Which samples and shards a deletion reaches follows from the tiny run's layout (tests/ledger/conftest.py):
u1's first rating (item 1, t=100) is in all four u1 samples (train u1:5:500 in shard 0, train u1:2:300 in
shard 1, valid u1:3:400 and u1:4:200); u1's last (item 5, t=500) only in its own (train, shard 0); u3 has
no training sample at all.
"""

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from ledger import catalog, deletions
from ledger.errors import DeletionNotFound, IdempotencyConflict, UserNotFound
from ledger.models import DeletionRequest, DeletionShard, Forgotten, Shard, utcnow

TOKEN = "a" * 64  # a token's HMAC, as service/deps.py makes it


def _count_requests(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(DeletionRequest)) or 0


def test_a_deletion_tombstones_its_samples_and_quarantines_the_shards_they_trained(
    session: Session, key: bytes,
) -> None:
    views = {v.shard: v for v in catalog.shard_views(session=session)}
    outcome = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key)
    request = outcome.request
    assert outcome.created and outcome.valid_sample_ids == ["u1:3:400", "u1:4:200"]
    assert (request.status, request.affected_shards, request.interactions_removed, request.samples_removed) == \
        ("quarantined", [0, 1], 1, 4)
    assert request.deleted_hmacs == [hmac_hex(key, "interaction", "u1:1:100")]
    assert request.subject_hmac == hmac_hex(key, "user", "u1"), "the request holds an HMAC, not the user id"
    assert request.certificate is None and request.completed_at is None
    parts = session.scalars(select(DeletionShard).order_by(DeletionShard.shard)).all()
    assert [(p.shard, p.seq, p.old_version, p.old_manifest_hmac, p.new_version) for p in parts] == \
        [(k, 1, 1, hmac_hex(key, "manifest", str(views[k].manifest_sha256)), None) for k in (0, 1)], \
        "the old version held the deleted data: an HMAC names it, never its plain hash"
    assert [(s.state, s.dirty_seq, s.clean_seq) for s in session.scalars(select(Shard).order_by(Shard.shard))] == \
        [("quarantined", 1, 0), ("quarantined", 1, 0)]
    assert deletions.get_deletion(session=session, request_id=request.id) is request
    assert [e.status for e in deletions.status_history(session=session, request_id=request.id)] == ["quarantined"]


def test_each_deletion_reaching_a_shard_bumps_its_dirty_seq(session: Session, key: bytes) -> None:
    deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key)  # shard 0 only
    deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key)  # u2:2:180, shard 0
    assert [(s.shard, s.dirty_seq) for s in session.scalars(select(Shard).order_by(Shard.shard))] == [(0, 2), (1, 0)]
    assert [p.seq for p in session.scalars(select(DeletionShard).order_by(DeletionShard.seq))] == [1, 2]


def test_a_deletion_reaching_no_shard_completes_at_once_with_its_certificate(session: Session, key: bytes) -> None:
    """u3's item 10 (t=270) is in two test samples only: u3:10:270 and u3:11:280."""
    before = utcnow() - timedelta(seconds=1)
    outcome = deletions.request_deletion(session=session, user_id="u3", item_ids=["10"], key=key)
    request = outcome.request
    assert outcome.valid_sample_ids == []
    assert (request.status, request.affected_shards, request.interactions_removed, request.samples_removed) == \
        ("completed", [], 1, 2)
    certificate = request.certificate
    assert certificate is not None
    assert {k: certificate[k] for k in ("request_id", "interactions_removed", "samples_removed", "shards",
                                        "serving_manifests_checked", "violations")} == \
        {"request_id": request.id, "interactions_removed": 1, "samples_removed": 2, "shards": [],
         "serving_manifests_checked": 2, "violations": 0}
    assert certificate["deleted_hmacs"] == [hmac_hex(key, "interaction", "u3:10:270")]
    kinds = session.execute(select(Forgotten.kind, func.count()).group_by(Forgotten.kind)).all()
    assert dict(kinds) == {"interaction": 1, "sample": 2}
    assert [e.status for e in deletions.status_history(session=session, request_id=request.id)] == \
        ["quarantined", "completed"]
    assert deletions.completed_since(session=session, since=before) == [request]
    assert deletions.completed_since(session=session, since=utcnow()) == []
    assert deletions.open_deletions_created(session=session) == []


def test_complete_refuses_while_a_serving_manifest_still_holds_deleted_data(session: Session, key: bytes) -> None:
    """Before any retrain both v1 manifests serve: u1's item 1 is in u1:5:500 (shard 0) and u1:2:300 (shard 1)."""
    request = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key).request
    deletions.complete(session=session, request=request, key=key)
    assert request.status == "failed" and request.completed_at is None
    # 2 training samples, and both versions chose their epoch on u1's deleted validation samples
    assert request.error == "4 serving manifest sample(s) or epoch selection(s) still hold deleted data"
    assert request.certificate is not None and request.certificate["violations"] == 4
    assert [(s["shard"], s["old_version"], s["new_version"]) for s in request.certificate["shards"]] == \
        [(0, 1, None), (1, 1, None)]
    assert session.scalar(select(func.count()).select_from(Forgotten)) == 0, "nothing is certified forgotten"
    assert deletions.open_deletions_created(session=session) == [], "failed requests wait for an admin"


def test_deleting_validation_samples_reaches_the_shards_whose_versions_chose_their_epoch_on_them(
    session: Session, key: bytes,
) -> None:
    """u3 has no training sample, but two validation samples, and both v1 versions chose their epoch on all
    eight (their manifests name them, and replaying them needs them): both shards retrain."""
    outcome = deletions.request_deletion(session=session, user_id="u3", item_ids=None, key=key)
    assert outcome.valid_sample_ids == ["u3:5:220", "u3:9:260"]
    assert (outcome.request.status, outcome.request.affected_shards) == ("quarantined", [0, 1])
    assert [s.state for s in session.scalars(select(Shard).order_by(Shard.shard))] == ["quarantined"] * 2


def test_bad_requests_raise_and_unknown_ids_are_not_found(session: Session, key: bytes) -> None:
    with pytest.raises(UserNotFound, match="nobody"):
        deletions.request_deletion(session=session, user_id="nobody", item_ids=None, key=key)
    with pytest.raises(UserNotFound, match=r"with item\(s\) \['12'\]"):  # u1 never rated item 12
        deletions.request_deletion(session=session, user_id="u1", item_ids=["12"], key=key)
    session.rollback()  # as the gateway does on an error
    deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key)
    with pytest.raises(UserNotFound, match="no live interactions"):  # already tombstoned
        deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key)
    with pytest.raises(DeletionNotFound, match="no-such-id"):
        deletions.get_deletion(session=session, request_id="no-such-id")


def test_deleted_data_is_named_by_keyed_hmacs() -> None:
    a = hmac_hex(b"key-1", "interaction", "u1:1:100")
    assert a == hmac_hex(b"key-1", "interaction", "u1:1:100")
    assert a != hmac_hex(b"key-2", "interaction", "u1:1:100")
    assert a != hmac_hex(b"key-1", "sample", "u1:1:100"), "the kind is part of what is signed"
    assert "u1" not in a and len(a) == 64


def test_idempotency_binds_the_user_and_the_set_of_items() -> None:
    bind = deletions.idempotency_hmac
    assert bind(key=b"k", user_id="u1", item_ids=["2", "1", "1"]) == bind(key=b"k", user_id="u1", item_ids=["1", "2"])
    assert bind(key=b"k", user_id="u1", item_ids=["1"]) != bind(key=b"k", user_id="u2", item_ids=["1"])
    assert bind(key=b"k", user_id="u1", item_ids=None) != bind(key=b"k", user_id="u1", item_ids=["1", "2"])
    assert bind(key=b"k", user_id="u1", item_ids=None) != bind(key=b"other", user_id="u1", item_ids=None)
    assert "u1" not in bind(key=b"k", user_id="u1", item_ids=None)


def test_same_key_and_request_answers_the_first_another_request_is_a_conflict(session: Session, key: bytes) -> None:
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["1", "5"], key=key,
                                       idempotency_key="k-1", token_hmac=TOKEN)
    again = deletions.request_deletion(session=session, user_id="u1", item_ids=["5", "1", "5"], key=key,
                                       idempotency_key="k-1", token_hmac=TOKEN)
    assert first.created and not again.created and again.request is first.request
    assert again.valid_sample_ids == []
    for user, items in [("u1", ["1"]), ("u2", ["1", "5"]), ("u1", None)]:
        with pytest.raises(IdempotencyConflict, match="another deletion request"):
            deletions.request_deletion(session=session, user_id=user, item_ids=items, key=key,
                                       idempotency_key="k-1", token_hmac=TOKEN)
    other_token = deletions.request_deletion(session=session, user_id="u2", item_ids=["2"], key=key,
                                             idempotency_key="k-1", token_hmac="b" * 64)
    assert other_token.created, "a key is scoped to its token"
    assert _count_requests(session) == 2


def test_find_idempotent_releases_a_key_older_than_24_hours(session: Session, key: bytes) -> None:
    binding = deletions.idempotency_hmac(key=key, user_id="u1", item_ids=["5"])
    assert deletions.find_idempotent(session=session, token_hmac=TOKEN, idempotency_key="k", binding=binding) is None
    old = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key,
                                     idempotency_key="k", token_hmac=TOKEN).request
    assert deletions.find_idempotent(session=session, token_hmac=TOKEN, idempotency_key="k", binding=binding) is old
    old.created_at = utcnow() - timedelta(hours=24, minutes=1)
    session.flush()
    new = deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key,
                                     idempotency_key="k", token_hmac=TOKEN)
    assert new.created and new.request is not old
    assert (old.idempotency_key, new.request.idempotency_key) == (None, "k")


def test_a_key_claimed_concurrently_answers_with_the_winner(
    session: Session, key: bytes, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first lookup misses a request committed a moment later; the unique (token, key) insert catches it."""
    winner = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key,
                                        idempotency_key="k", token_hmac=TOKEN).request
    real, calls = deletions.find_idempotent, []

    def late(**kwargs: object) -> DeletionRequest | None:
        calls.append(kwargs)
        return None if len(calls) == 1 else real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(deletions, "find_idempotent", late)
    loser = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key,
                                       idempotency_key="k", token_hmac=TOKEN)
    assert (loser.created, loser.request.id, len(calls)) == (False, winner.id, 2)
    calls.clear()
    with pytest.raises(IdempotencyConflict):
        deletions.request_deletion(session=session, user_id="u2", item_ids=None, key=key,
                                   idempotency_key="k", token_hmac=TOKEN)
    assert _count_requests(session) == 1


def test_open_deletions_are_the_quarantined_and_retraining_ones_oldest_first(session: Session, key: bytes) -> None:
    first = deletions.request_deletion(session=session, user_id="u1", item_ids=["5"], key=key).request
    second = deletions.request_deletion(session=session, user_id="u4", item_ids=["2"], key=key).request
    first.created_at, second.created_at = utcnow() - timedelta(minutes=2), utcnow() - timedelta(minutes=3)
    session.flush()
    assert deletions.open_deletions_created(session=session) == [second.created_at, first.created_at]
    first.status = "retraining"
    second.status = "failed"
    session.flush()
    assert deletions.open_deletions_created(session=session) == [first.created_at]
