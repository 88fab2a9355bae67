"""The worker's jobs. Each is idempotent: run twice, it does the work once.

``retrain_shard(k)``: under a per-shard lock, snapshot shard k's live training samples (and the
newest deletion they cover), train a LoRA from scratch with the shard's seed, write it as a new
immutable version with its validation predictions, pass the validation gate, then in one transaction
make it the serving version and complete the covered deletion requests with their certificate;
publish the swap, purge what the completed requests deleted, and enqueue again if the shard got
dirty meanwhile.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import LockError, LockNotOwnedError, RedisError
from redis.lock import Lock
from rq import get_current_job

from apa import artifacts, gate
from apa.errors import APAError, GateFailed
from apa.faults import crash_point
from apa.model import BaseModel, load_base_model
from apa.purge import purge_run_files
from apa.runs import read_run, train_version
from jobs import queue
from jobs.periodic import Periodic
from ledger import backlog, db, purges, retrains
from ledger.db import session_scope
from worker import centres, metrics
from worker.liveness import lock_token
from worker.record import extra_samples, version_record
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker process loads once: settings, the base model, the Redis connection."""

    settings: WorkerSettings
    base: BaseModel
    redis: Redis
    name: str = ""  # the RQ worker's name; its heartbeat tells the reconciler whether it lives


_context: WorkerContext | None = None


def set_context(context: WorkerContext | None) -> None:
    global _context
    _context = context


def get_context() -> WorkerContext:
    """The process's context; built on first use when the worker entry point did not set one."""
    if _context is None:
        settings = get_worker_settings()
        set_context(WorkerContext(settings=settings, redis=queue.connect(settings.redis_url),
                                  base=load_base_model(settings.base_model_dir, device=settings.device)))
    assert _context is not None
    return _context


@contextmanager
def held_lock(redis: Redis, name: str, ttl_s: int, owner: str = "") -> Iterator[bool]:
    """A Redis lock kept alive by a heartbeat while held; yields whether it was acquired.

    Its token names ``owner`` (a worker), so the reconciler frees it as soon as that worker's
    heartbeat is gone instead of waiting out ``ttl_s``.
    """
    lock = Lock(redis, name, timeout=ttl_s, blocking=False, thread_local=False)  # the heartbeat thread extends it
    if not lock.acquire(token=lock_token(owner)):
        yield False
        return

    def extend() -> None:
        try:
            lock.extend(ttl_s, replace_ttl=True)
        except (LockError, RedisError):
            log.warning("could not extend %s; another worker may take the shard", name, exc_info=True)

    heartbeat = Periodic(f"heartbeat {name}", extend, ttl_s / 3)
    heartbeat.start()
    try:
        yield True
    finally:
        heartbeat.stop()
        heartbeat.join()
        try:
            lock.release()
        except LockNotOwnedError:
            log.warning("%s expired before release", name)


def retrain_shard(shard: int) -> dict[str, Any]:
    ctx = get_context()
    settings = ctx.settings
    names = queue.Names(settings.redis_prefix)
    result: dict[str, Any]
    with held_lock(ctx.redis, names.lock(shard), settings.lock_ttl_s, ctx.name) as held:
        if not held:
            # the holder (a retrain, or a reconciler's sweep) re-enqueues, or the next reconcile round does;
            # this job's de-duplication marker would refuse that, so it goes with the job
            queue.clear_queued(ctx.redis, settings.redis_prefix, shard)
            log.info("shard %d is being retrained by another worker; it re-enqueues if still dirty", shard)
            metrics.RETRAINS.labels(outcome="busy").inc()
            return {"shard": shard, "status": "busy"}
        queue.clear_queued(ctx.redis, settings.redis_prefix, shard)
        with session_scope(settings.ledger_url) as session:
            snapshot = retrains.begin_retrain(session=session, shard=shard)
        if snapshot is None:
            metrics.RETRAINS.labels(outcome="clean").inc()
            return {"shard": shard, "status": "clean"}
        crash_point("retrain.snapshot")
        started = time.perf_counter()
        try:
            result = _retrain_once(ctx, snapshot)
        except Exception:
            metrics.RETRAINS.labels(outcome="retried").inc()  # RQ runs the job again after its backoff
            raise
        metrics.RETRAIN_SECONDS.observe(time.perf_counter() - started)
        metrics.RETRAINS.labels(outcome=result["status"]).inc()
    if result["status"] == "published":
        crash_point("retrain.published")
        purge_completed()
    _enqueue_if_dirty(ctx, shard)
    return result


def _retrain_once(ctx: WorkerContext, snapshot: retrains.RetrainSnapshot) -> dict[str, Any]:
    """One attempt. A refused gate is final (training is deterministic: again gives the same version);
    another error is raised while RQ has retries left for this job (rq.Retry, enqueued with the job),
    so the shard lock is released during the backoff, and recorded as the shard's failure otherwise."""
    try:
        return _retrain(ctx, snapshot)
    except GateFailed as exc:
        return _fail(ctx, snapshot.shard, f"validation gate: {exc}")
    except Exception as exc:
        job = get_current_job()
        if job is not None and job.retries_left:
            log.exception("retrain of shard %d failed; RQ tries again (%d retries left)", snapshot.shard,
                          job.retries_left)
            raise
        log.exception("retrain of shard %d failed, no retries left", snapshot.shard)
        return _fail(ctx, snapshot.shard, f"{type(exc).__name__}: {exc}")


def _retrain(ctx: WorkerContext, snapshot: retrains.RetrainSnapshot) -> dict[str, Any]:
    settings, run_dir, shard = ctx.settings, snapshot.run_path, snapshot.shard
    started = time.perf_counter()
    run = read_run(run_dir).with_samples(extra_samples(snapshot.ingested))  # ingested samples: from the ledger
    keep, keep_valid = set(snapshot.sample_ids), set(snapshot.valid_ids)
    samples = [s for s in run.splits["train"] if s.sample_id in keep]
    valid = [s for s in run.splits["valid"] if s.sample_id in keep_valid]
    if not samples:
        raise GateFailed(f"shard {shard} has no training samples left")
    labels = {s.sample_id: s.label for s in valid}
    old = None
    if snapshot.old_version is not None:
        old_file = artifacts.version_dir(run_dir, shard, snapshot.old_version) / "valid_predictions.json"
        old = artifacts.read_json(old_file) if old_file.is_file() else None
    metrics: dict[str, Any] = {}

    def check(predictions: dict[str, float]) -> None:
        metrics.update(gate.check(predictions, old, labels, max_auc_drop=settings.gate_max_auc_drop))

    version, _ = train_version(run, run_dir, ctx.base, shard, samples, valid=valid, gate=check)
    record = version_record(run_dir, shard, version, metrics)
    with session_scope(settings.ledger_url) as session:
        completed = retrains.publish_version(session=session, snapshot=snapshot, record=record,
                                             key=settings.hmac_secret())
    crash_point("retrain.recorded")
    seconds = time.perf_counter() - started
    queue.publish(ctx.redis, settings.redis_prefix, {"type": "swap", "shard": shard, "version": version})
    log.info("shard %d v%d serving (%d samples, %.1f s); completed %s", shard, version, len(samples), seconds,
             completed)
    return {"shard": shard, "status": "published", "version": version, "samples": len(samples),
            "completed": completed, "seconds": round(seconds, 3), **metrics}


def _fail(ctx: WorkerContext, shard: int, error: str) -> dict[str, Any]:
    settings = ctx.settings
    with session_scope(settings.ledger_url) as session:
        failed = retrains.fail_retrain(session=session, shard=shard, error=error)
    queue.publish(ctx.redis, settings.redis_prefix, {"type": "failed", "shard": shard})
    log.error("shard %d stays quarantined: %s (requests failed: %s)", shard, error, failed)
    return {"shard": shard, "status": "failed", "error": error, "failed": failed}


def _enqueue_if_dirty(ctx: WorkerContext, shard: int) -> None:
    settings = ctx.settings
    with session_scope(settings.ledger_url) as session:
        dirty = shard in retrains.dirty_shards(session=session)
        ingested = backlog.any_ingested(session=session)
    if dirty:
        queue.enqueue_retrain(ctx.redis, settings, shard)
    if ingested:  # the new version's validation predictions, and the ingestion retrains now due
        queue.enqueue_prepare(ctx.redis, settings.redis_prefix)


def purge_completed() -> dict[str, Any]:
    """Purge the data of every completed deletion request not yet purged: files, the semantic centres
    (recomputed from the live members), then ledger rows."""
    ctx = get_context()
    settings = ctx.settings
    purged = []
    with held_lock(ctx.redis, queue.Names(settings.redis_prefix).lock("purge"), settings.lock_ttl_s,
                   ctx.name) as held:
        if not held:
            return {"status": "busy"}
        with session_scope(settings.ledger_url) as session:
            pending = purges.pending_purges(session=session)
        members: int | None = None
        recomputed = False  # the live members are the same for every request of the round: once is enough
        for request_id in pending:
            try:
                with session_scope(settings.ledger_url) as session:
                    plan = purges.purge_plan(session=session, request_id=request_id)
                report = purge_run_files(plan.run_path, set(plan.sample_ids), plan.superseded,
                                         set(plan.interaction_hmacs), plan.prompts)
                crash_point("purge.files-removed")
                if not recomputed:  # fitted with the deleted samples
                    members, recomputed = centres.recompute(ctx.base, settings.ledger_url), True
                with session_scope(settings.ledger_url) as session:
                    purges.finish_purge(session=session, plan=plan, centre_members=members)
            except (APAError, OSError):
                log.exception("purge of deletion %s failed; the reconciler tries again", request_id)
                continue
            log.info("purged deletion %s: %s", request_id, report)
            metrics.PURGES.inc()
            purged.append(request_id)
        if purged:
            db.checkpoint(settings.ledger_url)  # the database file's old pages held the purged rows
    return {"status": "ok", "purged": purged}
