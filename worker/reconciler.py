"""The ledger is the truth, the queue a wake-up call: enqueue every dirty shard, purge, clean up.

Runs at worker start and every ``APA_RECONCILE_INTERVAL_S`` seconds, so a lost Redis message or a
killed worker loses nothing: a started job whose worker has no heartbeat is failed, the shard lock it
held is freed, its shard (still dirty in the ledger) is enqueued again, and what it left half-written
in the run folder is removed (``sweep``).
Failed shards wait for ``POST /admin/shards/{k}/retrain``.
"""

import logging
from pathlib import Path
from typing import Any

from apa import artifacts
from jobs import queue
from jobs.periodic import Periodic
from ledger import backlog, catalog, purges, retrains, run_import
from ledger.db import session_scope
from ledger.errors import LedgerError
from worker.liveness import recover_orphans
from worker.settings import WorkerSettings
from worker.tasks import held_lock

log = logging.getLogger(__name__)


def reconcile(settings: WorkerSettings, redis: Any, owner: str = "") -> dict[str, Any]:
    """One round; ``owner`` (the worker's name) is put in the tokens of the locks the sweep takes."""
    orphans = recover_orphans(redis, settings.redis_prefix)  # first: frees the locks dead workers held
    lost = queue.drop_lost_markers(redis, settings.redis_prefix)  # after: the jobs of dead workers are failed
    with session_scope(settings.ledger_url) as session:
        try:
            run_dir: Path | None = Path(run_import.get_run(session=session).path)
        except LedgerError:
            run_dir = None
    # before enqueueing: a retrain enqueued now never finds its shard's lock held by the sweep
    removed = sweep(settings, redis, run_dir, owner) if run_dir is not None and run_dir.is_dir() else 0
    with session_scope(settings.ledger_url) as session:
        dirty = retrains.dirty_shards(session=session)
        to_purge = purges.pending_purges(session=session)
        due = backlog.due_shards(session=session, min_samples=settings.ingest_min_samples,
                                max_delay_s=settings.ingest_max_delay_s)
        prepare = backlog.any_ingested(session=session, live=True)  # placements, memory, new versions' predictions
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
    if enqueued or to_purge or removed or lost or orphans["failed_jobs"] or orphans["freed_locks"]:
        log.info("reconciled: enqueued shards %s, %d purge(s) pending, %d stray path(s) removed, markers of lost "
                 "jobs dropped %s, orphans %s", enqueued, len(to_purge), removed, lost, orphans)
    return {"dirty": dirty, "enqueued": enqueued, "purges": len(to_purge), "strays_removed": removed,
            "lost_markers": lost, **orphans}


def sweep(settings: WorkerSettings, redis: Any, run_dir: Path, owner: str = "") -> int:
    """Remove what killed writers left in the run folder; returns how many paths went.

    * In ``adapters/shard-<k>``: temp folders, and version folders the ledger does not keep. A worker
      killed between the rename and the ledger's record leaves such a version, trained on data that may
      be deleted since; no purge finds it (purges read the ledger), and nothing serves it. Taken under
      the shard's lock, the lock of the only writer of that folder.
    * Anywhere else: ``.tmp-*`` files and folders (a rewrite killed before its rename), under the purge
      lock, which the writers of those files hold (the purge, the preparation of ingested samples).

    Only what has not changed for ``APA_STRAY_AGE_S`` (10 s) goes: a writer that lost its lock without
    knowing (stalled past the lock's TTL) still renames and records within seconds of writing. A first look
    without the lock finds nothing in most rounds, so the locks are taken only when there is work.
    """
    names = queue.Names(settings.redis_prefix)
    removed = 0
    for shard, folder in _shard_folders(run_dir):
        if _strays(settings, folder, shard):
            with held_lock(redis, names.lock(shard), settings.lock_ttl_s, owner) as held:
                if held:  # listed again under the lock
                    removed += artifacts.remove(_strays(settings, folder, shard))
    if _temp_outside_shards(settings, run_dir):
        with held_lock(redis, names.lock("purge"), settings.lock_ttl_s, owner) as held:
            if held:
                removed += artifacts.remove(_temp_outside_shards(settings, run_dir))
    return removed


def _shard_folders(run_dir: Path) -> list[tuple[int, Path]]:
    found = ((p.name.removeprefix("shard-"), p) for p in (run_dir / "adapters").glob("shard-*") if p.is_dir())
    return sorted((int(k), p) for k, p in found if k.isdigit())


def _strays(settings: WorkerSettings, folder: Path, shard: int) -> list[Path]:
    """The shard folder's temp folders and unkept versions, listed before the ledger is read (a version
    recorded meanwhile is then seen as kept)."""
    on_disk = {v: folder / f"v{v}" for v in artifacts.versions(folder)}
    temp = [p for p in folder.iterdir() if p.name.startswith(artifacts.TEMP_PREFIX)]
    with session_scope(settings.ledger_url) as session:
        kept = catalog.kept_versions(session=session).get(shard, set())
    return artifacts.unchanged_for([*temp, *(p for v, p in on_disk.items() if v not in kept)],
                                   settings.stray_age_s)


def _temp_outside_shards(settings: WorkerSettings, run_dir: Path) -> list[Path]:
    adapters = run_dir / "adapters"
    return artifacts.unchanged_for([p for p in artifacts.temp_paths(run_dir) if p.parent.parent != adapters],
                                   settings.stray_age_s)


def reconciler(settings: WorkerSettings, redis: Any, owner: str = "") -> Periodic:
    """The reconcile round every ``APA_RECONCILE_INTERVAL_S`` seconds (the worker runs the first at start)."""
    return Periodic("reconciler", lambda: reconcile(settings, redis, owner), settings.reconcile_interval_s)
