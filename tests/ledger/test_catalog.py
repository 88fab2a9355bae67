"""The ledger's catalog reads (ledger.catalog) on the tiny run, on SQLite and PostgreSQL."""

from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from apa.artifacts import read_json
from ledger import catalog, deletions
from ledger.errors import UserNotFound
from tests.conftest import RATINGS, TITLES
from tests.ledger.conftest import SHARD_SAMPLES, VALID_SAMPLES

COUNTS = Counter(item for rows in RATINGS.values() for item, _, _ in rows)


def test_titles_of_known_items_and_none_for_unknown_ones(session: Session) -> None:
    assert catalog.titles(session=session, item_ids=["1", "12", "nope"]) == {"1": TITLES["1"], "12": TITLES["12"]}
    assert catalog.titles(session=session, item_ids=[]) == {}


def test_popularity_counts_live_interactions(session: Session) -> None:
    assert catalog.popularity(session=session, item_ids=list(TITLES)) == dict(COUNTS)
    assert catalog.popularity(session=session, item_ids=["nope"]) == {}


def test_popular_items_by_count_then_id_leaving_out_the_excluded(session: Session) -> None:
    expected = sorted(COUNTS, key=lambda item: (-COUNTS[item], item))
    assert catalog.popular_items(session=session, exclude=set(), limit=5) == expected[:5]
    excluded = set(expected[:2])
    assert catalog.popular_items(session=session, exclude=excluded, limit=5) == expected[2:7]
    assert catalog.popular_items(session=session, exclude=set(), limit=0) == []


def test_live_history_is_the_users_ratings_in_time_order(session: Session) -> None:
    expected = [(item, float(rating)) for item, rating, ts in sorted(RATINGS["u2"], key=lambda r: (r[2], r[0]))]
    assert catalog.live_history(session=session, user_id="u2") == expected
    with pytest.raises(UserNotFound, match="nobody"):
        catalog.live_history(session=session, user_id="nobody")


def test_shard_views_and_live_samples_match_the_run_folder(session: Session, service_home: Path) -> None:
    views = catalog.shard_views(session=session)
    assert [v.shard for v in views] == [0, 1]
    train = catalog.live_sample_ids(session=session, split="train")
    per_shard = [catalog.live_sample_ids(session=session, split="train", shard=v.shard) for v in views]
    assert sorted(s for samples in per_shard for s in samples) == train, "the shards partition the training samples"
    for view, samples in zip(views, per_shard, strict=True):
        assert (view.state, view.version, view.dirty) == ("serving", 1, False)
        assert view.path is not None and view.trained_at is not None and view.trained_at.utcoffset() == timedelta(0)
        manifest = read_json(view.path / "manifest.json")
        assert view.manifest_sha256 == manifest["manifest_sha256"]
        assert view.n_samples == len(samples) == manifest["n_samples"]
    assert catalog.live_sample_ids(session=session, split="valid")
    assert catalog.deletion_counts(session=session) == {}


def test_tombstoned_interactions_vanish_from_every_read(session: Session, key: bytes) -> None:
    """u1 deletes item 1, their first rating: every u1 sample contains it (two train, two valid)."""
    deletions.request_deletion(session=session, user_id="u1", item_ids=["1"], key=key)
    u1 = sorted(RATINGS["u1"], key=lambda r: (r[2], r[0]))
    assert catalog.live_history(session=session, user_id="u1") == [(i, float(r)) for i, r, _ in u1 if i != "1"]
    assert catalog.popularity(session=session, item_ids=["1", "5"]) == {"1": COUNTS["1"] - 1, "5": COUNTS["5"]}
    counts = COUNTS - Counter({"1": 1})
    expected = sorted(counts, key=lambda item: (-counts[item], item))
    assert catalog.popular_items(session=session, exclude=set(), limit=12) == expected
    assert catalog.live_sample_ids(session=session, split="train", shard=0) == \
        [s for s in SHARD_SAMPLES[0] if s != "u1:5:500"]
    assert catalog.live_sample_ids(session=session, split="train", shard=1) == \
        [s for s in SHARD_SAMPLES[1] if s != "u1:2:300"]
    assert catalog.live_sample_ids(session=session, split="valid") == \
        [s for s in VALID_SAMPLES if not s.startswith("u1:")]
    assert [(v.shard, v.state, v.version, v.dirty) for v in catalog.shard_views(session=session)] == \
        [(0, "quarantined", 1, True), (1, "quarantined", 1, True)]
    assert catalog.deletion_counts(session=session) == {"quarantined": 1}


def test_a_user_with_every_interaction_deleted_is_unknown(session: Session, key: bytes) -> None:
    deletions.request_deletion(session=session, user_id="u3", item_ids=None, key=key)
    with pytest.raises(UserNotFound, match="u3"):
        catalog.live_history(session=session, user_id="u3")
    assert catalog.deletion_counts(session=session) == {"quarantined": 1}, \
        "u3 trained no shard, but both versions chose their epoch on u3's validation samples"
