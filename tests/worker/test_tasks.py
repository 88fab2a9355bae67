"""The worker's failure paths and its catch-up: gate refusal, admin retry, lost messages, reruns, locks."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rq import SimpleWorker

from apa import artifacts
from jobs import queue
from ledger import catalog
from ledger.db import session_scope
from ledger.models import Sample
from tests.conftest import ADMIN_TOKEN, load_tiny, record_run, service_settings
from tests.service.test_flow import wait_for
from worker.reconciler import reconcile
from worker.settings import WorkerSettings
from worker.tasks import WorkerContext, held_lock, retrain_shard, set_context

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def env(service_home: Path, redis_prefix: str, tiny_model_dir: Path, tmp_path: Path) -> Iterator[dict]:
    from service.app import create_app

    settings = service_settings(service_home, f"sqlite:///{tmp_path / 'apa.db'}", redis_prefix, tiny_model_dir)
    record_run(settings)
    worker_settings = WorkerSettings(**{**settings.model_dump(include=set(WorkerSettings.model_fields)),
                                        "backoff_s": 0.0})
    redis = queue.connect(settings.redis_url)
    set_context(WorkerContext(settings=worker_settings, base=load_tiny(tiny_model_dir), redis=redis))
    with TestClient(create_app(settings)) as client:
        yield {"client": client, "settings": worker_settings, "redis": redis,
               "run_dir": service_home / "runs" / "tiny"}
    set_context(None)
    redis.close()


def work(env: dict) -> None:
    SimpleWorker([queue.queue(env["redis"], env["settings"].redis_prefix)], connection=env["redis"]).work(burst=True)


def delete_user_of_shard(env: dict, shard: int) -> dict:
    with session_scope(env["settings"].ledger_url) as session:
        user = min(s.user_id for s in session.query(Sample).filter(Sample.shard == shard))
    answer = env["client"].delete(f"/users/{user}/interactions", headers=AUTH)
    assert answer.status_code == 202
    return {**answer.json(), "user": user}


def shard_state(env: dict, shard: int) -> catalog.ShardView:
    with session_scope(env["settings"].ledger_url) as session:
        return catalog.shard_views(session=session)[shard]


def test_a_refused_version_leaves_the_shard_quarantined_until_an_admin_retry(env: dict) -> None:
    env["settings"].gate_max_auc_drop = -2.0  # no AUC can pass: the gate refuses every version
    request = delete_user_of_shard(env, 0)
    work(env)
    state = env["client"].get(f"/deletions/{request['request_id']}").json()
    assert state["status"] == "failed" and "validation gate" in state["error"]
    shards = request["affected_shards"]
    for shard in shards:
        view = shard_state(env, shard)
        assert (view.state, view.version) == ("failed", 1), "never rolled back, never a refused version"
        assert artifacts.versions(artifacts.shard_dir(env["run_dir"], shard)) == [1]
    other = next(u for u in ("u1", "u2", "u3", "u4") if u != request["user"])
    answer = env["client"].post("/recommend", json={"user_id": other, "candidates": ["1"]}).json()
    assert not set(shards) & {a["shard"] for a in answer["adapters"]}
    reconcile(env["settings"], env["redis"])  # failed shards wait for an admin
    assert queue.queue(env["redis"], env["settings"].redis_prefix).count == 0

    env["settings"].gate_max_auc_drop = 1.0
    for shard in shards:
        retry = env["client"].post(f"/admin/shards/{shard}/retrain", headers=AUTH)
        assert retry.status_code == 202 and retry.json() == {"shard": shard, "enqueued": True}
    work(env)
    state = env["client"].get(f"/deletions/{request['request_id']}").json()
    assert state["status"] == "completed" and state["certificate"]["violations"] == 0
    assert all(shard_state(env, shard).state == "serving" for shard in shards)


def test_the_reconciler_recovers_a_lost_queue(env: dict) -> None:
    request = delete_user_of_shard(env, 1)
    keys = list(env["redis"].scan_iter(f"*{env['settings'].redis_prefix}*"))
    env["redis"].delete(*keys)  # Redis lost the jobs (and the markers)
    result = reconcile(env["settings"], env["redis"])
    assert set(request["affected_shards"]) <= set(result["enqueued"])
    work(env)
    assert env["client"].get(f"/deletions/{request['request_id']}").json()["status"] == "completed"


def test_a_job_run_twice_retrains_once_and_a_held_lock_waits(env: dict) -> None:
    delete_user_of_shard(env, 0)
    names = queue.Names(env["settings"].redis_prefix)
    with held_lock(env["redis"], names.lock(0), 30) as held:
        assert held
        assert retrain_shard(0) == {"shard": 0, "status": "busy"}
    first = retrain_shard(0)
    assert first["status"] == "published" and first["version"] == 2
    assert retrain_shard(0) == {"shard": 0, "status": "clean"}
    assert artifacts.versions(artifacts.shard_dir(env["run_dir"], 0))[-1] == 2, "one new version, not two"


def test_the_reconciler_sweeps_what_killed_writers_left_under_their_locks(env: dict) -> None:
    """Old temp paths and versions the ledger does not know go; recorded versions, fresh paths (a live
    writer's) and a shard whose lock is held stay."""
    import os
    import shutil
    import time

    run, names = env["run_dir"], queue.Names(env["settings"].redis_prefix)
    v1 = artifacts.version_dir(run, 0, 1)
    orphans = [artifacts.version_dir(run, k, 2) for k in (0, 1)]  # renamed into place, never recorded
    temps = [artifacts.shard_dir(run, 0) / ".tmp-crashed", run / ".tmp-a1b2.parquet", v1 / ".tmp-c3d4.json"]
    fresh = artifacts.version_dir(run, 0, 3)
    for folder in [*orphans, fresh]:
        shutil.copytree(v1, folder)
    temps[0].mkdir()
    temps[1].write_text("half")
    temps[2].write_text("half")
    os.utime(fresh)  # copytree gave it v1's time
    old = time.time() - 60
    for path in [*orphans, *temps]:
        os.utime(path, (old, old))
    with held_lock(env["redis"], names.lock(1), 30) as held:  # shard 1 is being written: its folder waits
        assert held
        assert reconcile(env["settings"], env["redis"])["strays_removed"] == 4
    assert [p.exists() for p in [*orphans, *temps]] == [False, True, False, False, False]
    assert v1.is_dir() and fresh.is_dir()
    assert reconcile(env["settings"], env["redis"])["strays_removed"] == 1
    assert not orphans[1].exists() and artifacts.versions(artifacts.shard_dir(run, 1)) == [1]


def test_the_shard_lock_outlives_its_ttl_while_held(env: dict) -> None:
    """A retrain longer than the lock's TTL keeps the lock (the heartbeat extends it from its thread)."""
    import time

    name = queue.Names(env["settings"].redis_prefix).lock("ttl-test")
    with held_lock(env["redis"], name, 1) as held:
        assert held
        time.sleep(2.5)
        assert env["redis"].exists(name), "the heartbeat kept it alive past its 1 s TTL"
        with held_lock(env["redis"], name, 1) as second:
            assert not second
    assert not env["redis"].exists(name)


def test_worker_liveness_follows_the_heartbeat_not_rq(env: dict) -> None:
    """Counted while it beats, again after its key is wiped (a flush), gone once it stops beating."""
    from worker.liveness import Heartbeat

    redis, prefix = env["redis"], env["settings"].redis_prefix
    heartbeat = Heartbeat(redis, prefix, "w1", ttl_s=0.6)
    heartbeat.beat()
    heartbeat.start()
    try:
        assert queue.queue_status(redis, prefix)["workers"] == 1
        assert env["client"].get("/admin/status", headers=AUTH).json()["queue"]["workers"] == 1
        redis.delete(queue.Names(prefix).heartbeat("w1"))  # what a FLUSHDB does to it
        assert queue.live_workers(redis, prefix) == set()
        wait_for(lambda: queue.live_workers(redis, prefix) == {"w1"}, timeout_s=2.0)
    finally:
        heartbeat.stopped.set()  # a SIGKILL: no goodbye, the key just expires
        heartbeat.join()
    wait_for(lambda: queue.live_workers(redis, prefix) == set(), timeout_s=2.0)
    assert env["client"].get("/admin/status", headers=AUTH).json()["queue"]["workers"] == 0


def test_the_reconciler_fails_a_dead_workers_job_frees_its_lock_and_requeues_the_shard(env: dict) -> None:
    """A worker SIGKILLed mid-retrain leaves its job in RQ's started registry and holds the shard lock:
    judged by the job's own worker (no heartbeat), the job fails, the lock and temp dir go, and the
    shard (dirty in the ledger) is enqueued and retrained: one new version."""
    import os
    import time

    from rq.job import JobStatus
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    from worker.liveness import Heartbeat, lock_token

    redis, prefix, settings = env["redis"], env["settings"].redis_prefix, env["settings"]
    names = queue.Names(prefix)
    request = delete_user_of_shard(env, 0)
    q = queue.queue(redis, prefix)
    job = q.jobs[0]
    q.remove(job)  # "dequeued" by the worker about to die
    dead = SimpleWorker([q], connection=redis, name="dead-worker")
    dead.prepare_execution(job)
    dead.prepare_job_execution(job)
    queue.clear_queued(redis, prefix, 0)  # the job had started: it cleared its marker
    redis.set(names.lock(0), lock_token("dead-worker"), ex=600)
    tmp = artifacts.shard_dir(env["run_dir"], 0) / ".tmp-killed"
    tmp.mkdir()
    os.utime(tmp, (time.time() - 20, time.time() - 20))  # a minute-old temp dir would wait 10 min unlocked
    alive = Heartbeat(redis, prefix, "live-worker", ttl_s=30)
    alive.beat()
    redis.set(names.lock(1), lock_token("live-worker"), ex=600)  # a live worker's lock stays
    started = StartedJobRegistry(queue=q)
    assert job.id in started.get_job_ids(cleanup=False)

    result = reconcile(settings, redis)
    assert result["failed_jobs"] == [job.id]
    assert result["freed_locks"] == [names.lock(0)]
    assert 0 in result["enqueued"] and not tmp.exists()
    assert redis.exists(names.lock(1))
    assert job.id not in started.get_job_ids(cleanup=False)
    assert job.id in FailedJobRegistry(queue=q).get_job_ids()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    redis.delete(names.lock(1))
    work(env)
    assert env["client"].get(f"/deletions/{request['request_id']}").json()["status"] == "completed"
    assert artifacts.versions(artifacts.shard_dir(env["run_dir"], 0)) in ([2], [1, 2])
    assert shard_state(env, 0).version == 2
    assert reconcile(settings, redis)["failed_jobs"] == []


@pytest.mark.parametrize("registered", [False, True])
def test_a_job_killed_before_it_cleared_its_marker_is_enqueued_again(env: dict, registered: bool) -> None:
    """Killed after popping a retrain but before its first step, a worker leaves the job lost (not yet
    registered: RQ pops from several queues with a plain BLPOP) or started, and its de-duplication marker
    set: the reconciler drops the marker of a job that waits nowhere, so the shard is enqueued at once
    (the marker alone refused that for an hour, this deletion's and the next; found by bench/chaos.py)."""
    redis, prefix, settings = env["redis"], env["settings"].redis_prefix, env["settings"]
    request = delete_user_of_shard(env, 0)
    q = queue.queue(redis, prefix)
    job = q.jobs[0]
    q.remove(job)  # popped by a worker that dies before its first step
    if registered:
        dead = SimpleWorker([q], connection=redis, name="dead-worker")
        dead.prepare_execution(job)
        dead.prepare_job_execution(job)
    marker = queue.Names(prefix).queued(0)
    assert redis.get(marker) == job.id.encode(), "the marker names its job"
    result = reconcile(settings, redis)
    assert result["failed_jobs"] == ([job.id] if registered else [])
    assert result["lost_markers"] == [marker] and result["enqueued"] == [0]
    assert reconcile(settings, redis)["lost_markers"] == [], "the new job's marker waits with it"
    work(env)
    assert env["client"].get(f"/deletions/{request['request_id']}").json()["status"] == "completed"


def test_the_worker_counts_its_retrains_and_serves_its_metrics(env: dict) -> None:
    import socket
    import urllib.request

    from worker import metrics

    def count(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value("apa_worker_retrains_total", {"outcome": outcome}) or 0.0

    published, purges = count("published"), metrics.REGISTRY.get_sample_value("apa_worker_purges_total") or 0.0
    observed = metrics.REGISTRY.get_sample_value("apa_worker_retrain_seconds_count") or 0.0
    delete_user_of_shard(env, 0)
    work(env)
    assert count("published") >= published + 1
    assert metrics.REGISTRY.get_sample_value("apa_worker_retrain_seconds_count") >= observed + 1
    assert metrics.REGISTRY.get_sample_value("apa_worker_purges_total") >= purges + 1
    clean = count("clean")
    retrain_shard(0)  # nothing left to do
    assert count("clean") == clean + 1
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    queue.enqueue_retrain(env["redis"], env["settings"], 1)
    depth = metrics.serve(port, env["redis"], env["settings"].redis_prefix)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        metrics.REGISTRY.unregister(depth)
    assert "apa_worker_queue_depth 1.0" in text
    assert 'apa_worker_retrains_total{outcome="published"}' in text


def test_a_failing_retrain_is_retried_by_rq_with_the_lock_released_in_between(
        env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import metrics, tasks

    env["client"].app.state.gateway.settings.backoff_s = 0.0  # the gateway enqueues the job's rq.Retry
    real, calls = tasks.train_version, []

    def flaky(*args: object, **kwargs: object) -> object:
        shard = int(args[3])  # type: ignore[call-overload]  # train_version(run, run_dir, base, shard, ...)
        calls.append((shard, env["redis"].get(queue.Names(env["settings"].redis_prefix).lock(shard))))
        if len(calls) == 1:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tasks, "train_version", flaky)
    retried = metrics.REGISTRY.get_sample_value("apa_worker_retrains_total", {"outcome": "retried"}) or 0.0
    request = delete_user_of_shard(env, 0)
    work(env)  # the first run raises, RQ re-enqueues it (interval 0), the same burst runs it again
    first = calls[0][0]
    attempts = [token for shard, token in calls if shard == first]
    assert len(attempts) == 2 and all(attempts), "each attempt ran under the shard lock"
    assert attempts[0] != attempts[1], "the lock was released between the attempts (a new token)"
    assert len(calls) == 1 + len(request["affected_shards"]), "every other affected shard retrained once"
    assert metrics.REGISTRY.get_sample_value("apa_worker_retrains_total", {"outcome": "retried"}) == retried + 1
    state = env["client"].get(f"/deletions/{request['request_id']}").json()
    assert state["status"] == "completed"
    assert shard_state(env, 0).version == 2
