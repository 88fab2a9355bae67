"""Every crash point of a retrain, its purge and the preparation of ingested samples (issue 26), on real
processes: a gateway, workers, a Redis server of this module's own and the ledger (SQLite; PostgreSQL
where the machine has it).

For each point, a fresh world (a copy of the tiny run, a new ledger, a flushed Redis, a gateway); a
deletion (after an ingestion, for the ingestion's points); a worker that dies at the point (exit 137,
as a SIGKILL leaves it); then a new worker. Once the deletion has completed and been purged:

* its certificate counts no violation, and every shard serves exactly one version;
* the ledger and the disk agree: no version folder the ledger does not keep, none it keeps missing,
  no temp file or folder;
* no file under the run folder names a deleted sample (its id in a JSON file, a parquet table or the
  validation memory; its prompts in the embedding cache);
* no process of the dead worker is left (nothing in its session), and every scheduler lock is held by
  a live worker, if by anyone.

Processes are forked from a zygote (``tests/support/zygote.py``) that imported torch once.
"""

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from apa.faults import EXIT_CODE, POINTS
from tests.conftest import record_run, service_settings
from tests.support.faults import (
    AUTH,
    ROOT,
    RedisServer,
    Stack,
    Zygote,
    delete,
    disk_agrees,
    ingested_done,
    purged,
    serving_versions,
    session_processes,
    stale_scheduler_locks,
    traces,
    wait_until,
)

PREFIX = "apa-crash:"
T = 900_000_000  # 1998: a timestamp the API takes, after every hand-made rating
# A deletion of u4's latest rating (item 2) retrains shard 1 only, and both shards keep samples.
DELETED = ("u4", "2")
# (point, what the killed worker was doing): a deletion's retrain and purge; the retrain of a shard for an
# ingested training sample (then deleted); the preparation of an ingested validation sample (then deleted).
RETRAIN = [p for p in POINTS if p.split(".")[0] in ("retrain", "training", "version", "purge")
           and p != "training.epoch-saved"]  # `apa train`'s resumable epochs: tests/bench/test_state.py
CASES = [*((p, "deletion") for p in RETRAIN),
         *((p, "ingested-train") for p in ("retrain.snapshot", "version.renamed", "retrain.recorded")),
         ("ingest.memory-written", "ingested-valid")]
INGESTED = {"ingested-train": ("u4", "4", {"ingest_min_samples": 1, "ingest_valid_fraction": 0.0}),
            "ingested-valid": ("u3", "1", {"ingest_valid_fraction": 1.0})}


@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Zygote, RedisServer]]:
    root = tmp_path_factory.mktemp("crash-points")
    redis_server = RedisServer(root / "redis")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    zygote = Zygote(env, root / "zygote.log")
    try:
        yield zygote, redis_server
    finally:
        zygote.close()
        redis_server.stop()


@pytest.mark.parametrize(("point", "case"), CASES)
def test_a_worker_killed_at_a_crash_point_leaves_nothing_behind(
    point: str, case: str, ledger_url: str, processes: tuple[Zygote, RedisServer], tiny_run_template: Path,
    tiny_model_dir: Path, tmp_path: Path,
) -> None:
    zygote, redis_server = processes
    redis = redis_server.client()
    redis.flushall()
    home = tmp_path / "home"
    shutil.copytree(tiny_run_template, home)
    run = home / "runs" / "tiny"
    extra = INGESTED[case][2] if case in INGESTED else {}
    record_run(service_settings(home, ledger_url, PREFIX, tiny_model_dir))
    stack = Stack(home, ledger_url, redis_server.url, tiny_model_dir, tmp_path / "logs", zygote=zygote,
                  gate_max_auc_drop=1.0, stray_age_s=1, **extra)
    try:
        stack.start_gateway()
        dying = stack.start_worker(fault_point=point)
        user, item = DELETED
        if case in INGESTED:
            user, item, _ = INGESTED[case]
            answer = stack.http.post(f"/users/{user}/interactions", headers=AUTH,
                                     json={"interactions": [{"item_id": item, "rating": 5, "timestamp": T}]})
            assert answer.status_code == 202, answer.text
        else:
            request_id, deleted = delete(stack, ledger_url, run, user, item)
        assert dying.wait(timeout=120) == EXIT_CODE, f"the worker never reached {point}\n{stack.log_tail()}"
        stack.workers.remove(dying)
        stack.start_worker()
        if case in INGESTED:
            wait_until(lambda: ingested_done(ledger_url, f"{user}:{item}:{T}"), 120, "the ingested sample trained "
                       "or in the memory", poll_s=0.25)
            request_id, deleted = delete(stack, ledger_url, run, user, item)
        done = stack.wait_completed(request_id, timeout_s=120)
        assert done["certificate"]["violations"] == 0
        wait_until(lambda: purged(ledger_url, request_id), 60, "the deletion purged", poll_s=0.25)
        wait_until(lambda: disk_agrees(ledger_url, run), 30, "the ledger and the disk agree", poll_s=0.25)
        assert set(serving_versions(ledger_url).values()) == {("serving", 1)}, serving_versions(ledger_url)
        assert traces(run, deleted) == [], "files naming a deleted sample"
        assert session_processes(dying.pid) == [], "a process of the dead worker outlived it"
        # freed by the reconciler once the dead worker's heartbeat has expired (2 s TTL, 1 s rounds here)
        wait_until(lambda: stale_scheduler_locks(redis, PREFIX) == {}, 10, "no dead worker's scheduler lock")
    finally:
        stack.close()
        redis.close()
