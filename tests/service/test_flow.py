"""The whole flow on the tiny model, on SQLite and on PostgreSQL, with the machine's Redis:
DELETE → the next /recommend leaves the quarantined shard out → the worker (in-process, burst)
retrains it → the request completes with a certificate → the new version is served; the deleted
data is purged from the ledger and the run folder."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from rq import SimpleWorker

from apa import artifacts, sisa
from apa.hashing import sha256_file
from apa.model import load_base_model
from apa.replay import verify_version
from jobs import queue
from ledger import catalog
from ledger.db import session_scope
from ledger.models import Interaction, Sample
from tests.conftest import ADMIN_TOKEN, gateway_with_worker, record_run, service_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def env(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> Iterator[dict]:
    with gateway_with_worker(service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir),
                             tiny_model_dir) as env:
        yield env


def run_worker(env: dict) -> None:
    SimpleWorker([queue.queue(env["redis"], env["settings"].redis_prefix)], connection=env["redis"]).work(burst=True)


def user_with_train_samples(run_dir: Path) -> tuple[str, set[int]]:
    frame = pd.read_parquet(run_dir / "samples.parquet")
    train = frame[frame["split"] == "train"]
    counts = train.groupby("user_id")["shard"].agg(lambda s: set(s.tolist()))
    user = min(counts.index, key=lambda u: (len(counts[u]), u))  # fewest shards: the others keep serving
    return str(user), {int(k) for k in counts[user]}


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_delete_quarantines_retrains_certifies_and_purges(env: dict) -> None:
    client, run_dir, settings = env["client"], env["run_dir"], env["settings"]
    user, shards = user_with_train_samples(run_dir)
    before = client.post("/recommend", json={"user_id": user, "candidates": ["1", "2"]})
    assert before.status_code == 200, before.text
    assert {a["shard"] for a in before.json()["adapters"]} >= shards
    assert before.json()["fallback"] is False

    deleted = client.delete(f"/users/{user}/interactions", headers=AUTH)
    assert deleted.status_code == 202, deleted.text
    body = deleted.json()
    assert body["status"] == "quarantined"
    assert set(body["affected_shards"]) == shards
    assert deleted.headers["Location"] == f"/deletions/{body['request_id']}"

    # the user is gone for /recommend; another user's answer no longer mixes the quarantined shard
    assert client.post("/recommend", json={"user_id": user, "candidates": ["1"]}).status_code == 404
    other = next(u for u in ("u1", "u2", "u3", "u4") if u != user)
    during = client.post("/recommend", json={"user_id": other, "candidates": ["1"]}).json()
    assert not shards & {a["shard"] for a in during["adapters"]}
    if len(shards) == 2:
        assert during["fallback"] is True
    status = client.get("/admin/status", headers=AUTH).json()
    assert {s["shard"] for s in status["shards"] if s["state"] == "quarantined"} == shards
    assert status["queue"]["depth"] == len(shards)
    assert status["deletions"] == {"quarantined": 1}

    run_worker(env)

    final = client.get(f"/deletions/{body['request_id']}").json()
    assert final["status"] == "completed", final
    cert = final["certificate"]
    assert cert["violations"] == 0
    assert cert["serving_manifests_checked"] == 2
    assert cert["interactions_removed"] > 0 and cert["samples_removed"] > 0
    assert len(cert["deleted_hmacs"]) == cert["interactions_removed"]
    assert [c["shard"] for c in cert["shards"]] == sorted(shards)
    for c in cert["shards"]:
        assert c["old_version"] == 1 and c["new_version"] == 2
        assert c["old_manifest_sha256"] != c["new_manifest_sha256"]
        manifest = artifacts.read_json(artifacts.version_dir(run_dir, c["shard"], 2) / "manifest.json")
        assert manifest["manifest_sha256"] == c["new_manifest_sha256"]
        assert c["new_adapter_sha256"] == manifest["adapter_sha256"] == sha256_file(
            artifacts.version_dir(run_dir, c["shard"], 2) / "adapter_model.safetensors")
        assert c["verify"] == f"apa verify {run_dir} --shard {c['shard']} --version 2"
        replay = verify_version(run_dir, load_base_model(settings.base_model_dir), c["shard"], 2)
        assert replay.equal, replay  # the worker's retrain is what its manifest gives, byte for byte
        assert all(s["user_id"] != user for s in manifest["samples"])
        assert artifacts.versions(artifacts.shard_dir(run_dir, c["shard"])) == [2]  # v1 purged

    # the gateway hot-swaps the new versions in (pub/sub, or the ledger poll) and lifts the quarantine
    def swapped() -> bool:
        adapters = client.post("/recommend", json={"user_id": other, "candidates": ["1"]}).json()["adapters"]
        return {(a["shard"], a["version"]) for a in adapters} >= {(k, 2) for k in shards}

    wait_for(swapped)
    assert all(s["state"] == "serving" for s in client.get("/admin/status", headers=AUTH).json()["shards"])

    # purged: no rows, no samples in the run folder, no baseline trained on them, no cached pass
    with session_scope(settings.ledger_url) as session:
        assert session.query(Interaction).filter(Interaction.user_id == user).count() == 0
        assert session.query(Sample).filter(Sample.user_id == user).count() == 0
    frame = pd.read_parquet(run_dir / "samples.parquet")
    assert user not in set(frame["user_id"])
    for baseline in [artifacts.SINGLE, *(sisa.adapter_id(k) for k in range(2))]:
        for version in artifacts.versions(artifacts.shard_dir(run_dir, baseline)):
            manifest = artifacts.read_json(artifacts.version_dir(run_dir, baseline, version) / "manifest.json")
            assert all(s["user_id"] != user for s in manifest["samples"])
    assert not (run_dir / "cache" / "eval").exists() and not (run_dir / "cache" / "train").exists()
    for path in run_dir.glob("**/v*/valid_predictions.json"):
        assert not any(key.startswith(f"{user}:") for key in json.loads(path.read_text()))
    assert user not in json.dumps(artifacts.read_json(run_dir / "run.json")["samples"])
    metrics = client.get("/metrics").text
    assert 'apa_deletions{status="completed"} 1.0' in metrics
    assert "apa_time_to_quarantine_seconds_count 1.0" in metrics

    # the run folder remembers the HMACs: importing it into a new ledger does not bring the user back
    fresh = settings.model_copy(update={"database_url": f"sqlite:///{run_dir.parent / 'fresh.db'}"})
    record_run(fresh)
    with session_scope(fresh.ledger_url) as session:
        assert session.query(Interaction).filter(Interaction.user_id == user).count() == 0
        assert session.query(Interaction).count() > 0


def test_deletions_during_a_retrain_coalesce(env: dict) -> None:
    """Two deletions on one shard before the worker runs cost one retrain; the shard serves after it."""
    client, settings = env["client"], env["settings"]
    with session_scope(settings.ledger_url) as session:
        users = sorted({s.user_id for s in session.query(Sample).filter(Sample.shard == 0)})
    first = client.delete(f"/users/{users[0]}/interactions", headers=AUTH).json()
    second = client.delete(f"/users/{users[-1]}/interactions", headers=AUTH).json()
    assert 0 in first["affected_shards"] and 0 in second["affected_shards"]
    run_worker(env)
    with session_scope(settings.ledger_url) as session:
        versions = catalog.shard_views(session=session)
    assert versions[0].version == 2, "one retrain covered both deletions"
    for request_id in (first["request_id"], second["request_id"]):
        assert client.get(f"/deletions/{request_id}").json()["status"] == "completed"


def test_a_second_replica_applies_the_quarantine_from_pub_sub(env: dict, tiny_model_dir: Path) -> None:
    """Replica B polls the ledger only every minute: the quarantine reaches it by the Redis message."""
    from service.app import create_app

    settings_b = env["settings"].model_copy(update={"poll_interval_s": 60.0})
    user, shards = user_with_train_samples(env["run_dir"])
    with TestClient(create_app(settings_b)) as replica:
        histories = replica.app.state.gateway.replica.histories  # type: ignore[attr-defined]
        other = next(u for u in ("u1", "u2", "u3", "u4") if u != user)
        before = replica.post("/recommend", json={"user_id": other, "candidates": ["1"]}).json()
        assert shards <= {a["shard"] for a in before["adapters"]}
        assert replica.post("/recommend", json={"user_id": user, "candidates": ["1"]}).status_code == 200
        assert user in histories
        assert env["client"].delete(f"/users/{user}/interactions", headers=AUTH).status_code == 202

        def excluded() -> bool:
            answer = replica.post("/recommend", json={"user_id": other, "candidates": ["1"]}).json()
            return not shards & {a["shard"] for a in answer["adapters"]}

        wait_for(excluded, timeout_s=5.0)
        wait_for(lambda: user not in histories, timeout_s=5.0)  # the event named the user

        # an entry that slipped in anyway is dropped when B learns that the deletion completed
        histories.put(user, "stale history", np.zeros(4), histories.epoch)
        run_worker(env)
        wait_for(lambda: user not in histories and other in histories, timeout_s=10.0)
