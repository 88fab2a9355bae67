"""Online learning end to end on the tiny model (SQLite and PostgreSQL, the machine's Redis): ingested
samples are placed and brought into the validation memory by the worker, trained into a new version
that the gateway hot-swaps without quarantine, coalesced with a deletion, and forgotten like any other."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from rq import SimpleWorker

from apa import artifacts
from jobs import queue
from ledger import backlog, catalog
from ledger.db import session_scope
from ledger.models import Sample, Shard
from tests.conftest import ADMIN_TOKEN, gateway_with_worker, service_settings
from tests.service.test_flow import wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = 900_000_000  # 1998: a timestamp the API takes


@pytest.fixture
def make_env(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> Iterator[Any]:
    stack: list[Any] = []

    def make(**extra: Any) -> dict:
        settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, **extra)
        context = gateway_with_worker(settings, tiny_model_dir)
        stack.append(context)
        return context.__enter__()

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)


def work(env: dict) -> None:
    """Run every queued job, deletions' first (as `apa worker` does)."""
    SimpleWorker(queue.queues(env["redis"], env["settings"].redis_prefix), connection=env["redis"]).work(burst=True)


def ingest_batch(env: dict, user: str, items: list[tuple[str, int, int]]) -> dict:
    answer = env["client"].post(f"/users/{user}/interactions", headers=AUTH, json={
        "interactions": [{"item_id": i, "rating": r, "timestamp": t} for i, r, t in items]})
    assert answer.status_code == 202, answer.text
    return answer.json()


def samples(env: dict, user: str) -> list[Sample]:
    with session_scope(env["settings"].ledger_url) as session:
        return list(session.query(Sample).filter(Sample.user_id == user, Sample.ingested_at.is_not(None))
                    .order_by(Sample.sample_id))


def manifest(env: dict, shard: int, version: int) -> dict:
    return artifacts.read_json(artifacts.version_dir(env["run_dir"], shard, version) / "manifest.json")


def test_ingested_samples_are_placed_trained_into_a_new_version_and_hot_swapped(make_env: Any) -> None:
    env = make_env(ingest_min_samples=1, ingest_valid_fraction=0.0)
    client = env["client"]
    assert ingest_batch(env, "u1", [("6", 5, T + 0), ("7", 1, T + 1)])["samples"] == {"train": 2, "valid": 0}
    assert all(s.shard is None for s in samples(env, "u1")), "the worker embeds and places them"
    status = client.get("/admin/status", headers=AUTH).json()
    assert status["ingest"]["unplaced_samples"] == 2

    work(env)  # prepare: place; then each shard's retrain (due at one sample), on the ingestion queue

    placed = samples(env, "u1")
    assert all(s.shard in (0, 1) and s.trained_version == 2 for s in placed)
    with session_scope(env["settings"].ledger_url) as session:
        shards = {s.shard: s for s in session.query(Shard)}
        assert all(shards[s.shard].centre is not None for s in placed), "the centres used are kept"
        views = {v.shard: v for v in catalog.shard_views(session=session)}
    for sample in placed:
        assert views[sample.shard].state == "serving" and views[sample.shard].version == 2
        named = {s["sample_id"] for s in manifest(env, sample.shard, 2)["samples"]}
        assert sample.sample_id in named, "the new version's manifest lists the new sample"
        assert artifacts.versions(artifacts.shard_dir(env["run_dir"], sample.shard)) == [1, 2], \
            "no quarantine, no purge: the old version served until the new one was published"

    def swapped() -> bool:
        adapters = client.post("/recommend", json={"user_id": "u2", "candidates": ["1"]}).json()["adapters"]
        return {(a["shard"], a["version"]) for a in adapters} >= {(s.shard, 2) for s in placed}

    wait_for(swapped)
    assert all(s["pending_samples"] == 0 for s in client.get("/admin/status", headers=AUTH).json()["shards"])

    # a deletion of the ingested data: retrained again, and no serving manifest names the samples
    deleted = client.delete("/users/u1/interactions", headers=AUTH, params={"item_id": ["6", "7"]}).json()
    assert set(deleted["affected_shards"]) == {s.shard for s in placed}
    work(env)
    final = client.get(f"/deletions/{deleted['request_id']}").json()
    assert final["status"] == "completed", final
    cert = final["certificate"]
    assert cert["violations"] == 0 and cert["untrained_samples_removed"] == 0
    assert {(c["shard"], c["old_version"], c["new_version"]) for c in cert["shards"]} == {
        (s.shard, 2, 3) for s in placed}
    for sample in placed:
        assert sample.sample_id not in {s["sample_id"] for s in manifest(env, sample.shard, 3)["samples"]}
    assert samples(env, "u1") == [], "purged: the rows, prompts with them, are gone"


def test_an_ingestion_and_a_deletion_of_one_shard_coalesce_into_one_retrain(make_env: Any) -> None:
    env = make_env(ingest_valid_fraction=0.0)  # min samples 32: nothing is due by count
    client = env["client"]
    ingest_batch(env, "u3", [("1", 5, T + 0)])
    work(env)  # places it; not due yet
    [sample] = samples(env, "u3")
    assert sample.shard is not None and sample.trained_version is None
    shard = sample.shard
    with session_scope(env["settings"].ledger_url) as session:
        other = min(s.user_id for s in session.query(Sample).filter(Sample.shard == shard, Sample.user_id != "u3",
                                                                  Sample.ingested_at.is_(None)))
    deleted = client.delete(f"/users/{other}/interactions", headers=AUTH).json()
    assert shard in deleted["affected_shards"]
    work(env)
    with session_scope(env["settings"].ledger_url) as session:
        view = catalog.shard_views(session=session)[shard]
        assert view.version == 2, "one retrain covered the deletion and the pending sample"
        assert backlog.pending(session=session) == {}
    named = {s["sample_id"]: s["user_id"] for s in manifest(env, shard, 2)["samples"]}
    assert sample.sample_id in named and other not in named.values()
    assert client.get(f"/deletions/{deleted['request_id']}").json()["status"] == "completed"


def test_deleting_pending_data_needs_no_retrain(make_env: Any) -> None:
    env = make_env(ingest_valid_fraction=0.0)
    client = env["client"]
    ingest_batch(env, "u4", [("6", 4, T + 0), ("8", 2, T + 1)])
    work(env)
    assert all(s.shard is not None and s.trained_version is None for s in samples(env, "u4"))
    deleted = client.delete("/users/u4/interactions", headers=AUTH, params={"item_id": ["6", "8"]})
    body = deleted.json()
    assert body["status"] == "completed" and body["affected_shards"] == []
    cert = client.get(f"/deletions/{body['request_id']}").json()["certificate"]
    assert cert["untrained_samples_removed"] == 2 and cert["shards"] == []
    waiting = [job.description for q in queue.queues(env["redis"], env["settings"].redis_prefix) for job in q.jobs]
    assert waiting == ["purge deleted data"], "no retrain"
    work(env)  # the purge
    assert samples(env, "u4") == []
    with session_scope(env["settings"].ledger_url) as session:
        assert all(v.version == 1 for v in catalog.shard_views(session=session))


def test_validation_samples_get_every_shards_prediction_before_the_attention_uses_them(make_env: Any) -> None:
    env = make_env(ingest_valid_fraction=1.0)
    client = env["client"]
    replica = client.app.state.gateway.replica  # type: ignore[attr-defined]
    assert ingest_batch(env, "u2", [("3", 5, T + 0)])["samples"] == {"train": 0, "valid": 1}
    [sample] = samples(env, "u2")
    replica.sync()
    assert sample.sample_id not in replica.attention.in_use.memory.sample_ids, "not before its predictions"
    work(env)
    with session_scope(env["settings"].ledger_url) as session:
        views = catalog.shard_views(session=session)
    for view in views:
        assert view.path is not None
        assert sample.sample_id in artifacts.read_json(view.path / "valid_predictions.json")
    wait_for(lambda: sample.sample_id in replica.attention.in_use.memory.sample_ids)


def test_another_replica_drops_the_users_cached_history(make_env: Any) -> None:
    from service.app import create_app

    env = make_env()
    settings_b = env["settings"].model_copy(update={"poll_interval_s": 60.0})
    with TestClient(create_app(settings_b)) as replica_b:
        histories = replica_b.app.state.gateway.replica.histories  # type: ignore[attr-defined]
        assert replica_b.post("/recommend", json={"user_id": "u1", "candidates": ["6"]}).status_code == 200
        assert "u1" in histories
        ingest_batch(env, "u1", [("6", 5, T + 0)])
        wait_for(lambda: "u1" not in histories, timeout_s=5.0)  # by the pub/sub event
        assert "6" not in [i["item_id"] for i in replica_b.post("/recommend", json={"user_id": "u1"}).json()["items"]]


def test_the_reconciler_enqueues_a_shard_whose_oldest_pending_sample_is_due(make_env: Any) -> None:
    from worker.reconciler import reconcile
    from worker.tasks import get_context

    env = make_env(ingest_valid_fraction=0.0)
    ingest_batch(env, "u2", [("3", 4, T)])
    work(env)  # placed, not due: one sample of 32, not an hour old
    [sample] = samples(env, "u2")
    settings = get_context().settings
    assert reconcile(settings, env["redis"])["enqueued"] == []
    settings.ingest_max_delay_s = 0.0
    assert reconcile(settings, env["redis"])["enqueued"] == [sample.shard]
    jobs = queue.ingest_queue(env["redis"], settings.redis_prefix).jobs
    assert [j.args for j in jobs if j.func_name == queue.RETRAIN_TASK] == [(sample.shard,)], "on the ingestion queue"
    work(env)
    assert samples(env, "u2")[0].trained_version == 2
