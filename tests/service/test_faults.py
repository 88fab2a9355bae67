"""Fault injection with real processes (issue 13): one gateway and its workers as subprocesses on the tiny
run, a Redis server of this module's own (flushed and killed at will), and PostgreSQL behind a local
proxy that refuses or goes silent. The faults share one stack (process starts dominate the time), and
each test first brings it to what it needs (``ready``), so each also runs alone; after each: the
deletion completes, none is lost or faked, and the worker count in /admin/status is the truth."""

import shutil
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from rq.registry import FailedJobRegistry, StartedJobRegistry

from apa import artifacts
from jobs import queue
from tests.conftest import POSTGRES_URL, record_run, service_settings
from tests.support.faults import AUTH, Proxy, RedisServer, Stack, wait_until

pytestmark = pytest.mark.slow
PREFIX = "apa-fault:"
DEADLINE = {"forget_deadline_s": 120, "forget_yield_at": 0.02, "forget_shed_at": 0.9}
# Training samples' targets and the shards each deletion quarantines, and both shards keep samples. The first
# four are their user's latest live interaction when their turn comes (in no other live sample's history):
# one shard each. u1:2:300 is in the history of u1's validation sample u1:3:400, on which both shards'
# versions chose their epoch: both retrain. The tests take them in this order whatever order they run in, so
# each test handles a deletion of one shard or of both.
TARGETS = [("u4", "2", (1,)), ("u1", "5", (0,)), ("u2", "2", (0,)), ("u4", "11", (0,)), ("u1", "2", (0, 1))]
PROBE = "u3"  # never deleted: its samples are all validation and test


@pytest.fixture(scope="module")
def world(tiny_run_template: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("faults")
    home = root / "home"
    shutil.copytree(tiny_run_template, home)
    ledger = f"sqlite:///{root / 'apa.db'}"
    record_run(service_settings(home, ledger, PREFIX, tiny_model_dir))
    redis_server = RedisServer(root / "redis")
    stack = Stack(home, ledger, redis_server.url, tiny_model_dir, root / "logs", gate_max_auc_drop=1.0, **DEADLINE)
    world = {"stack": stack, "redis_server": redis_server, "root": root, "run": home / "runs" / "tiny",
             "targets": list(TARGETS)}
    try:
        yield world
    finally:
        stack.close()
        redis_server.stop()


def ready(world: dict[str, Any], workers: int) -> Stack:
    """The gateway up and exactly ``workers`` workers counted, whatever the tests before left running."""
    stack = world["stack"]
    if stack.gateway is None:
        stack.start_gateway()
    while len(stack.workers) > workers:
        proc = stack.workers.pop()
        proc.send_signal(signal.SIGTERM)  # a clean stop: its heartbeat key goes at once
        proc.wait(timeout=30)
    while len(stack.workers) < workers:
        stack.start_worker()
    wait_until(lambda: stack.workers_alive() == workers, 180, f"{workers} worker(s) counted")
    return stack


def delete_next(world: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """DELETE the next target interaction; returns the request id and the shards it quarantines."""
    user, item, shards = world["targets"].pop(0)
    answer = world["stack"].http.delete(f"/users/{user}/interactions", params={"item_id": item}, headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "quarantined" and answer.json()["affected_shards"] == list(shards), answer.text
    return str(answer.json()["request_id"]), shards


def versions(world: dict[str, Any]) -> dict[int, list[int]]:
    return {k: artifacts.versions(artifacts.shard_dir(world["run"], k)) for k in (0, 1)}


def clean(world: dict[str, Any]) -> None:
    """After a fault: no lock held, no temp folder, nothing left 'started'."""
    redis = world["redis_server"].client()
    names = queue.Names(PREFIX)
    wait_until(lambda: not any(redis.exists(names.lock(k)) for k in (0, 1, "purge")), 30, "locks freed")
    wait_until(lambda: not list(world["run"].glob("**/.tmp-*")), 30, "no temp folder left")
    started = StartedJobRegistry(queue=queue.queue(redis, PREFIX))
    wait_until(lambda: started.get_job_ids(cleanup=False) == [], 30, "nothing left 'started'")  # a running one ends
    redis.close()


def test_worker_sigkilled_mid_retrain_then_two_racing_workers_recover_it(world: dict[str, Any]) -> None:
    """Killed with the new version's files half-written: its job fails (not left 'started'), its lock
    and temp folder go, and of two new workers racing for it one retrains: exactly one new version."""
    stack, root = ready(world, workers=0), world["root"]
    marker = root / "writing"
    slow = stack.start_worker(slow_marker=marker)
    wait_until(lambda: stack.workers_alive() == 1, 180, "slow worker alive")
    before = versions(world)
    request_id, shards = delete_next(world)
    wait_until(marker.exists, 120, "the retrain is writing its version")
    assert list(world["run"].glob("**/.tmp-*")), "killed with a temp folder on disk"
    stack.kill_worker(slow)
    wait_until(lambda: stack.workers_alive() == 0, 10, "the killed worker no longer counted")
    assert stack.deletion(request_id)["status"] in ("quarantined", "retraining")

    redis = world["redis_server"].client()
    q = queue.queue(redis, PREFIX)
    for shard in shards:
        for _ in range(2):  # past the de-duplication marker: each worker gets a job for the same shard
            q.enqueue(queue.RETRAIN_TASK, shard, job_timeout=600)
    stack.start_worker()
    stack.start_worker()
    done = stack.wait_completed(request_id, timeout_s=240)
    assert done["certificate"]["violations"] == 0 and done["overdue"] is False
    wait_until(lambda: q.count == 0, 60, "queue drained")
    after = {k: [before[k][-1] + 1] for k in shards}
    wait_until(lambda: {k: versions(world)[k] for k in shards} == after, 30, "exactly one new version, the old purged")
    wait_until(lambda: stack.workers_alive() == 2, 30, "two live workers counted")
    clean(world)
    failed = FailedJobRegistry(queue=queue.queue(redis, PREFIX)).get_job_ids()
    assert len(failed) == 1, "the killed job is failed, not left started"
    redis.close()


def test_redis_flushed_after_a_delete(world: dict[str, Any]) -> None:
    """The job and the quarantine event are lost in Redis; the reconciler finds the dirty shards in the
    ledger. The worker, stopped meanwhile, is not counted, and is counted again after the flush."""
    stack, redis_server = ready(world, workers=2), world["redis_server"]
    spare = stack.workers[1]
    spare.send_signal(signal.SIGTERM)  # a clean stop: its heartbeat key goes at once
    spare.wait(timeout=30)
    stack.workers.remove(spare)
    wait_until(lambda: stack.workers_alive() == 1, 10, "one worker after a clean stop")
    [worker] = stack.workers
    worker.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: stack.workers_alive() == 0, 10, "a stopped worker is not counted")
        request_id, _ = delete_next(world)
        redis = redis_server.client()
        redis.flushall()
        redis.close()
    finally:
        worker.send_signal(signal.SIGCONT)
    wait_until(lambda: stack.workers_alive() == 1, 10, "counted again after the flush")
    stack.wait_completed(request_id, timeout_s=120)
    clean(world)


def test_redis_down_during_a_delete(world: dict[str, Any]) -> None:
    stack, redis_server = ready(world, workers=1), world["redis_server"]
    redis_server.stop()
    try:
        started = time.monotonic()
        request_id, _ = delete_next(world)  # recorded in the ledger and quarantined, though Redis is down
        assert time.monotonic() - started < 15
        assert stack.deletion(request_id)["status"] == "quarantined"
        assert stack.status()["queue"]["workers"] is None, "unknown, not a guess"
        time.sleep(2)
        assert stack.deletion(request_id)["status"] == "quarantined"
    finally:
        redis_server.start()
    stack.wait_completed(request_id, timeout_s=120)
    wait_until(lambda: stack.workers_alive() == 1, 10, "the worker counted once Redis is back")
    clean(world)


def test_gateway_restarted_while_quarantined(world: dict[str, Any]) -> None:
    stack = ready(world, workers=1)
    [worker] = stack.workers
    worker.send_signal(signal.SIGTERM)
    worker.wait(timeout=30)
    stack.workers.remove(worker)
    wait_until(lambda: stack.workers_alive() == 0, 10, "no worker")
    redis = world["redis_server"].client()
    redis.flushall()  # nothing waits for a worker: the deletion below is the only dirty thing
    redis.close()
    request_id, shards = delete_next(world)
    stack.stop_gateway(signal.SIGKILL)
    stack.start_gateway()
    assert [s["shard"] for s in stack.status()["shards"] if s["state"] != "serving"] == list(shards)
    answer = stack.http.post("/recommend", json={"user_id": PROBE, "candidates": ["1"]})
    assert answer.status_code == 200 and not set(shards) & {a["shard"] for a in answer.json()["adapters"]}
    stack.start_worker()
    stack.wait_completed(request_id, timeout_s=240)
    wait_until(lambda: all(s["state"] == "serving" for s in stack.status()["shards"]), 30, "serving again")
    assert stack.workers_alive() == 1
    clean(world)


def test_a_deletion_under_load_completes_within_its_deadline(world: dict[str, Any]) -> None:
    """Four clients keep /recommend busy; the deletion's retrain still completes within
    APA_FORGET_DEADLINE_S (the model thread yields from 2% of it on), no answer is an error, and no
    request sent after the 202 was answered with the quarantined shard."""
    stack = ready(world, workers=1)
    stop = threading.Event()
    answers: list[tuple[float, int, set[tuple[int, int]]]] = []  # (sent at, status, (shard, version) used)

    def load() -> None:
        with httpx.Client(base_url=str(stack.http.base_url), timeout=60, trust_env=False) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post("/recommend", json={"user_id": PROBE, "candidates": ["1", "2", "3"]})
                adapters = r.json().get("adapters", []) if r.status_code == 200 else []
                used = {(a["shard"], a["version"]) for a in adapters}
                answers.append((sent, r.status_code, used))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(load)
        try:
            wait_until(lambda: len(answers) >= 4, 60, "load running")
            before = versions(world)
            request_id, shards = delete_next(world)
            accepted = time.monotonic()
            done = stack.wait_completed(request_id, timeout_s=DEADLINE["forget_deadline_s"])
            completed = time.monotonic()
        finally:
            stop.set()
    assert done["overdue"] is False and completed - accepted < DEADLINE["forget_deadline_s"]
    assert {status for _, status, _ in answers} <= {200, 503}, "no errors under load"
    # the retrained version may be served before the client sees `completed`; the old one never after the 202
    quarantined = {(k, v) for k in shards for v in before[k]}
    assert not [a for a in answers if a[0] > accepted and a[1] == 200 and quarantined & a[2]]
    assert len([a for a in answers if a[0] > accepted]) > 0
    assert stack.workers_alive() == 1
    clean(world)


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_ledger_refused_and_silent(ledger_url: str, service_home: Path, tiny_model_dir: Path, tmp_path: Path,
                                   redis_prefix: str) -> None:
    """PostgreSQL behind a proxy that refuses, then goes silent: every route answers quickly (5xx, never
    a hang), /healthz stays fast, and service resumes when the ledger is back."""
    record_run(service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir))
    url = httpx.URL(POSTGRES_URL.replace("postgresql+psycopg", "http"))
    proxy = Proxy((url.host, url.port or 5432))
    proxied = ledger_url.replace(f"{url.host}:{url.port}", f"127.0.0.1:{proxy.port}")
    redis = RedisServer(tmp_path / "redis")
    stack = Stack(service_home, proxied, redis.url, tiny_model_dir, tmp_path / "logs", request_timeout_s=3)
    probes = [("GET", "/admin/status"), ("GET", "/deletions/none"), ("POST", "/recommend"),
              ("DELETE", "/users/u1/interactions"), ("GET", "/readyz")]
    try:
        stack.start_gateway()
        assert stack.http.post("/recommend", json={"user_id": "u2", "candidates": ["1"]}).status_code == 200
        for mode in ("refuse", "silent"):
            proxy.set_mode(mode)
            for method, path in probes:
                started = time.monotonic()
                kwargs: dict[str, Any] = {"json": {"user_id": "u2", "candidates": ["1"]}} if method == "POST" else {}
                r = stack.http.request(method, path, headers=AUTH, timeout=20, **kwargs)
                took = time.monotonic() - started
                assert r.status_code == 503 and took < 10, (mode, path, r.status_code, took, r.text)
                assert r.headers["content-type"] == "application/json"
                assert path == "/readyz" or "Retry-After" in r.headers
            with ThreadPoolExecutor(8) as pool:  # a crowd of stuck requests does not stall health
                crowd = [pool.submit(stack.http.get, "/admin/status", headers=AUTH, timeout=20) for _ in range(8)]
                started = time.monotonic()
                assert stack.http.get("/healthz", timeout=5).status_code == 200
                assert time.monotonic() - started < 1.0
                assert all(f.result().status_code == 503 for f in crowd)
        proxy.set_mode("pass")
        wait_until(lambda: stack.http.get("/readyz", timeout=5).status_code == 200, 60, "ready again")
        assert stack.http.post("/recommend", json={"user_id": "u2", "candidates": ["1"]}).status_code == 200
    finally:
        stack.close()
        proxy.stop()
        redis.stop()
