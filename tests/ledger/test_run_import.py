"""Recording a run in the ledger (ledger.run_import): get_run and import_run, on SQLite and PostgreSQL."""

import itertools
import json
from pathlib import Path

import pytest
from sqlalchemy import BigInteger, insert, inspect, select
from sqlalchemy.orm import Session

from apa.hashing import hmac_hex
from apa.purge import FORGOTTEN
from ledger import catalog, db, deletions, run_import
from ledger.errors import LedgerError
from ledger.models import AuditEntry, Interaction, SampleInteraction
from service.settings import ServiceSettings
from tests.conftest import RATINGS, service_settings
from tests.ledger.conftest import SHARD_SAMPLES, TEST_SAMPLES, VALID_SAMPLES, fake_version
from worker.record import import_run as import_run_folder

N_INTERACTIONS = sum(len(rows) for rows in RATINGS.values())  # 6 + 8 + 8 + 8 = 30


@pytest.fixture
def empty(ledger_url: str, service_home: Path, redis_prefix: str, tiny_model_dir: Path) -> ServiceSettings:
    """A migrated ledger with no run yet, and the tiny run's folder."""
    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir)
    db.upgrade(ledger_url)
    return settings


def _reimport(session: Session, settings: ServiceSettings, versions: list[run_import.VersionRecord],
              run_path: Path | None = None) -> run_import.ImportSummary:
    """Import again with only adapter versions (an existing run's dataset and samples are not read)."""
    return run_import.import_run(
        session=session, run_path=run_path or settings.runs_dir / "tiny", dataset=None,  # type: ignore[arg-type]
        splits={}, shard_of={}, config={"shards": 2}, base_model_name="x", base_model_sha256="0" * 64,
        versions=versions, key=settings.hmac_secret())


def test_get_run_refuses_an_empty_ledger_and_names_the_recorded_run(empty: ServiceSettings) -> None:
    with db.session_scope(empty.ledger_url) as session, pytest.raises(LedgerError, match="holds no run"):
        run_import.get_run(session=session)
    with db.session_scope(empty.ledger_url) as session:
        import_run_folder(session, empty.runs_dir / "tiny", empty)
    with db.session_scope(empty.ledger_url) as session:
        run = run_import.get_run(session=session)
        assert (Path(run.path), run.dataset, run.shards) == ((empty.runs_dir / "tiny").resolve(), "handmade", 2)


def test_import_records_every_interaction_sample_shard_and_version(empty: ServiceSettings) -> None:
    with db.session_scope(empty.ledger_url) as session:
        summary = import_run_folder(session, empty.runs_dir / "tiny", empty)
    assert summary == run_import.ImportSummary(created=True, interactions=N_INTERACTIONS, samples=24,
                                               skipped_forgotten=0, versions_added=2)
    with db.session_scope(empty.ledger_url) as session:
        for shard, samples in SHARD_SAMPLES.items():
            assert catalog.live_sample_ids(session=session, split="train", shard=shard) == samples
        assert catalog.live_sample_ids(session=session, split="valid") == VALID_SAMPLES
        assert catalog.live_sample_ids(session=session, split="test") == sorted(TEST_SAMPLES)
        views = catalog.shard_views(session=session)
        audit = session.scalars(select(AuditEntry).where(AuditEntry.action == "run.import")).one()
    assert [(v.shard, v.state, v.version, v.n_samples, v.dirty) for v in views] == \
        [(0, "serving", 1, 4, False), (1, "serving", 1, 4, False)]
    assert (audit.subject, audit.detail) == ("tiny", {"interactions": 30, "samples": 24, "versions_added": 2,
                                                      "skipped_forgotten": 0})


def test_import_again_adds_nothing_and_one_ledger_serves_one_run(settings: ServiceSettings, tmp_path: Path) -> None:
    with db.session_scope(settings.ledger_url) as session:
        again = import_run_folder(session, settings.runs_dir / "tiny", settings)
        history = catalog.live_history(session=session, user_id="u1")
    assert again == run_import.ImportSummary(created=False, interactions=0, samples=0, skipped_forgotten=0,
                                             versions_added=0)
    assert [item for item, _ in history] == ["1", "4", "10", "2", "3", "5"]  # (timestamp, item_id) order
    other = tmp_path / "other"
    other.mkdir()
    with db.session_scope(settings.ledger_url) as session, pytest.raises(LedgerError, match="already serves"):
        _reimport(session, settings, [], run_path=other)


def test_forgotten_interactions_and_the_samples_holding_them_are_not_brought_back(empty: ServiceSettings) -> None:
    """u1's last rating (item 5 at t=500) is in one sample only, its own: 1 interaction + 1 sample skipped
    (``skipped_forgotten`` counts both)."""
    forgotten = [hmac_hex(empty.hmac_secret(), "interaction", "u1:5:500")]
    (empty.runs_dir / "tiny" / FORGOTTEN).write_text(json.dumps(forgotten))  # as a purge leaves it
    with db.session_scope(empty.ledger_url) as session:
        summary = import_run_folder(session, empty.runs_dir / "tiny", empty)
    assert (summary.interactions, summary.samples, summary.skipped_forgotten) == (N_INTERACTIONS - 1, 23, 2)
    with db.session_scope(empty.ledger_url) as session:
        assert "5" not in dict(catalog.live_history(session=session, user_id="u1"))
        assert catalog.live_sample_ids(session=session, split="train", shard=0) == SHARD_SAMPLES[0][1:]


def test_a_new_version_serves_at_once_unless_its_shard_is_dirty(settings: ServiceSettings, tmp_path: Path) -> None:
    v2 = [fake_version(tmp_path / f"shard-{k}-v2", shard=k, version=2, samples=[]) for k in (0, 1)]
    with db.session_scope(settings.ledger_url) as session:
        deletions.request_deletion(session=session, user_id="u4", item_ids=["2"], key=settings.hmac_secret())
    with db.session_scope(settings.ledger_url) as session:
        summary = _reimport(session, settings, v2)
        views = catalog.shard_views(session=session)
    assert summary.versions_added == 2
    assert [(v.shard, v.version) for v in views] == [(0, 2), (1, 1)], "u4:2:380 dirtied shard 1: it keeps v1"
    with db.session_scope(settings.ledger_url) as session:
        assert _reimport(session, settings, v2).versions_added == 0
    stray = fake_version(tmp_path / "shard-5-v1", shard=5, version=1, samples=[])
    with db.session_scope(settings.ledger_url) as session, pytest.raises(LedgerError, match="no shard 5"):
        _reimport(session, settings, [stray])


def _ids_by_key(url: str) -> dict[str, int]:
    with db.session_scope(url) as session:
        return {str(k): int(i) for k, i in session.execute(select(Interaction.key, Interaction.id))}


def _links(url: str) -> set[tuple[str, str]]:
    """(sample id, interaction key) of every link: what the ids stand for."""
    with db.session_scope(url) as session:
        return {(str(s), str(k)) for s, k in session.execute(
            select(SampleInteraction.sample_id, Interaction.key)
            .join(Interaction, Interaction.id == SampleInteraction.interaction_id))}


def _in_user_time_order(ids: dict[str, int]) -> bool:
    by_user_time = sorted(ids, key=lambda k: (k.split(":")[0], int(k.split(":")[2]), k.split(":")[1]))
    return [ids[k] for k in by_user_time] == sorted(ids.values())


def test_interaction_ids_are_random_not_in_user_time_order(empty: ServiceSettings) -> None:
    """The gap a deletion leaves between its neighbours' ids must not name the user: 30 ids drawn at random
    fall in (user, time) order once in 30! tries."""
    with db.session_scope(empty.ledger_url) as session:
        import_run_folder(session, empty.runs_dir / "tiny", empty)
    ids = _ids_by_key(empty.ledger_url)
    assert len(ids) == N_INTERACTIONS and not _in_user_time_order(ids)
    assert max(ids.values()) > 2**40, "63-bit ids, not a counter"


def test_migration_0004_gives_an_old_ledger_random_ids_and_keeps_every_link(
    empty: ServiceSettings, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ledger of 0003 with ids handed out 1, 2, 3... in (user, time) order, as `apa ledger import` did."""
    url = empty.ledger_url
    db.downgrade(url, "0003")
    counter = itertools.count(1)
    monkeypatch.setattr(run_import, "new_interaction_id", lambda: next(counter))
    with db.session_scope(url) as session:
        import_run_folder(session, empty.runs_dir / "tiny", empty)
    old_ids, old_links = _ids_by_key(url), _links(url)
    assert _in_user_time_order(old_ids) and max(old_ids.values()) == N_INTERACTIONS
    db.dispose_engines()
    db.upgrade(url)
    assert db.current_revision(url) == "0004"
    new_ids = _ids_by_key(url)
    assert set(new_ids) == set(old_ids) and not _in_user_time_order(new_ids)
    assert not set(new_ids.values()) & set(old_ids.values())
    assert _links(url) == old_links, "every link still joins its sample to the same interactions"
    if url.startswith("postgresql"):
        columns = {c["name"]: c["type"] for c in inspect(db.get_engine(url)).get_columns("interactions")}
        assert isinstance(columns["id"], BigInteger)
    with db.session_scope(url) as session:  # new rows get random ids; a deletion cascades as before
        session.add(Interaction(key="u9:1:1", user_id="u9", item_id="1", rating=5.0, timestamp=1))
        session.flush()
        assert session.scalars(select(Interaction.id).where(Interaction.key == "u9:1:1")).one() > N_INTERACTIONS
        deletions.request_deletion(session=session, user_id="u1", item_ids=None, key=empty.hmac_secret())
    db.downgrade(url, "0003")  # keeps the random ids; new rows still get one
    with db.session_scope(url) as session:
        session.execute(insert(Interaction.__table__).values(key="u9:2:2", user_id="u9", item_id="2", rating=1.0,
                                                             timestamp=2))
    assert _ids_by_key(url)["u1:1:100"] == new_ids["u1:1:100"]
