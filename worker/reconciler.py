"""The ledger is the truth, the queue a wake-up call: enqueue every dirty shard, purge, clean up.

Runs at worker start and every ``APA_RECONCILE_INTERVAL_S`` seconds, so a lost Redis message or a
killed worker loses nothing: a started job whose worker has no heartbeat is failed, the shard lock it
held is freed, and its shard (still dirty in the ledger) is enqueued again.
Failed shards wait for ``POST /admin/shards/{k}/retrain``.
"""

import logging
from pathlib import Path
from typing import Any

from apa import artifacts
from jobs import queue
from jobs.periodic import Periodic
from ledger import ingest, purges, retrains, run_import
from ledger.db import session_scope
from ledger.errors import LedgerError
from worker.liveness import recover_orphans
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

UNLOCKED_TEMP_AGE_S = 10.0


def reconcile(settings: WorkerSettings, redis: Any) -> dict[str, Any]:
    orphans = recover_orphans(redis, settings.redis_prefix)  # first: frees the locks dead workers held
    with session_scope(settings.ledger_url) as session:
        try:
            run_dir: Path | None = Path(run_import.get_run(session=session).path)
        except LedgerError:
            run_dir = None
        dirty = retrains.dirty_shards(session=session)
        to_purge = purges.pending_purges(session=session)
        due = ingest.due_shards(session=session, min_samples=settings.ingest_min_samples,
                                max_delay_s=settings.ingest_max_delay_s)
        prepare = ingest.any_ingested(session=session, live=True)  # placements, memory, new versions' predictions
    names = queue.Names(settings.redis_prefix)
    busy = [k for k in dirty if redis.exists(names.lock(k))]  # being retrained: that job re-enqueues if needed
    enqueued = [k for k in dirty if k not in busy
                and queue.enqueue_retrain(redis, settings, k)]
    enqueued += [k for k in due if k not in dirty and not redis.exists(names.lock(k))
                 and queue.enqueue_retrain(redis, settings, k, queue.INGESTION)]
    if prepare:
        queue.enqueue_prepare(redis, settings.redis_prefix)
    if to_purge:
        queue.enqueue_purge(redis, settings.redis_prefix)
    cleaned = 0
    if run_dir is not None and run_dir.is_dir():
        cleaned = artifacts.clean_temp_dirs(run_dir)
        for shard_dir in run_dir.glob("adapters/shard-*"):
            # Only the holder of a shard's lock writes its versions: with no lock, a temp folder is a dead
            # writer's (one a new holder made since the check above is seconds old and stays).
            shard = shard_dir.name.removeprefix("shard-")
            if shard.isdigit() and not redis.exists(names.lock(int(shard))):
                cleaned += artifacts.clean_temp_dirs(shard_dir, older_than_s=UNLOCKED_TEMP_AGE_S)
    if enqueued or to_purge or cleaned or orphans["failed_jobs"] or orphans["freed_locks"]:
        log.info("reconciled: enqueued shards %s, %d purge(s) pending, %d temp dir(s) removed, orphans %s",
                 enqueued, len(to_purge), cleaned, orphans)
    return {"dirty": dirty, "enqueued": enqueued, "purges": len(to_purge), "temp_dirs_removed": cleaned, **orphans}


def reconciler(settings: WorkerSettings, redis: Any) -> Periodic:
    """The reconcile round every ``APA_RECONCILE_INTERVAL_S`` seconds (the worker runs the first at start)."""
    return Periodic("reconciler", lambda: reconcile(settings, redis), settings.reconcile_interval_s)
