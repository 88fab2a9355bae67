"""Queue names, de-duplicated enqueueing, per-shard locks and pub/sub. Shared by gateway and worker.

Imports no torch and neither ``service`` nor ``worker``: the gateway enqueues jobs by dotted name
(``worker.tasks.retrain_shard``).

De-duplication: enqueueing a shard's retrain sets ``<prefix>retrain:queued:<k>`` (SET NX) to the new
job's id; the job clears it when it starts, before it snapshots the shard. A deletion that finds the
marker set is covered by the queued job; one that arrives after the snapshot enqueues the next retrain.
A marker whose job waits nowhere (a worker killed between popping the job and its first step) is
dropped by the reconciler (``drop_lost_markers``).

Priority: deletions' retrains go on ``<prefix>retrain``, which workers empty first; retrains for
ingested data and the preparation of ingested samples go on ``<prefix>ingest``, with markers of their
own, so a deletion never waits behind a queued ingestion job (whichever retrain of a shard runs first
covers both; the other finds nothing to do).
"""

import json
import logging
import uuid
from typing import Any

from redis import Redis
from rq import Queue, Retry

from apa.settings import CoreSettings

log = logging.getLogger(__name__)

RETRAIN_TASK = "worker.tasks.retrain_shard"
PURGE_TASK = "worker.tasks.purge_completed"
PREPARE_TASK = "worker.ingest.prepare_ingested"
DELETION, INGESTION = "deletion", "ingestion"  # retrain priorities
MARKER_TTL_S = 3600  # a queued job lost without running frees its shard after this
SOCKET_TIMEOUT_S = 10  # every Redis command answers within this, or raises (a worker's BLPOP waits less)


class Names:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def queue(self) -> str:
        return f"{self.prefix}retrain"

    @property
    def ingest_queue(self) -> str:
        return f"{self.prefix}ingest"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def queued(self, shard: int | str, priority: str = DELETION) -> str:
        return f"{self.prefix}retrain:queued:{shard}" if priority == DELETION else f"{self.prefix}ingest:queued:{shard}"

    def rate(self) -> str:
        """The rate limits' key prefix (``service.limits``)."""
        return f"{self.prefix}rate"

    def lock(self, shard: int | str) -> str:
        return f"{self.prefix}retrain:lock:{shard}"

    def heartbeat(self, worker: str) -> str:
        """A live worker's key (``worker.liveness``); ``*`` gives the pattern of all of them."""
        return f"{self.prefix}worker:{worker}"


def connect(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30)


def queue(redis: Redis, prefix: str) -> Queue:
    return Queue(Names(prefix).queue, connection=redis)


def ingest_queue(redis: Redis, prefix: str) -> Queue:
    return Queue(Names(prefix).ingest_queue, connection=redis)


def queues(redis: Redis, prefix: str) -> list[Queue]:
    """What a worker listens to, first things first: deletions' retrains, then ingestion's jobs."""
    return [queue(redis, prefix), ingest_queue(redis, prefix)]


def retry_policy(attempts: int, backoff_s: float) -> Retry | None:
    """RQ's retry of a job that raised: ``attempts`` runs in all, waiting backoff_s, 2 x backoff_s, ..."""
    if attempts <= 1:
        return None
    return Retry(max=attempts - 1, interval=[round(backoff_s * 2 ** i) for i in range(attempts - 1)])


def enqueue_retrain(redis: Redis, settings: CoreSettings, shard: int, priority: str = DELETION) -> bool:
    """Enqueue one retrain of ``shard`` unless one of this priority is already waiting, with the settings'
    job timeout and RQ retry (see :func:`retry_policy`). Returns whether it enqueued."""
    prefix = settings.redis_prefix
    names = Names(prefix)
    marker = names.queued(shard, priority)
    job_id = uuid.uuid4().hex
    if not redis.set(marker, job_id, nx=True, ex=MARKER_TTL_S):
        return False
    target = queue(redis, prefix) if priority == DELETION else ingest_queue(redis, prefix)
    try:
        target.enqueue(RETRAIN_TASK, shard, job_timeout=settings.retrain_timeout_s, result_ttl=3600,
                       failure_ttl=7 * 86400, description=f"retrain shard {shard} ({priority})",
                       retry=retry_policy(settings.max_attempts, settings.backoff_s), job_id=job_id)
    except Exception:
        redis.delete(marker)
        raise
    log.info("enqueued retrain of shard %d (%s)", shard, priority)
    return True


def clear_queued(redis: Redis, prefix: str, shard: int) -> None:
    """A retrain of ``shard`` starts: the queued ones of either priority are covered by it."""
    names = Names(prefix)
    redis.delete(names.queued(shard), names.queued(shard, INGESTION))


def enqueue_prepare(redis: Redis, prefix: str) -> bool:
    """Enqueue the preparation of ingested samples (``worker.ingest``) unless one is waiting."""
    marker = Names(prefix).queued("prepare", INGESTION)
    job_id = uuid.uuid4().hex
    if not redis.set(marker, job_id, nx=True, ex=MARKER_TTL_S):
        return False
    try:
        ingest_queue(redis, prefix).enqueue(PREPARE_TASK, job_timeout=3600, result_ttl=3600,
                                            description="prepare ingested samples", job_id=job_id)
    except Exception:
        redis.delete(marker)
        raise
    return True


def clear_prepare(redis: Redis, prefix: str) -> None:
    redis.delete(Names(prefix).queued("prepare", INGESTION))


# Delete a key only if it still holds the value judged (it may have changed hands meanwhile).
_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def delete_if_equal(redis: Redis, key: str | bytes, value: str | bytes) -> bool:
    return bool(redis.eval(_DELETE_IF_EQUAL, 1, key, value))


def drop_lost_markers(redis: Redis, prefix: str) -> list[str]:
    """Delete the de-duplication markers whose job waits nowhere: not queued, not scheduled (rq.Retry's
    backoff), not started; returns their keys. RQ pops a job from several queues with a plain BLPOP, so
    a worker killed before it registers the job loses it; killed before the job's first step, it leaves
    the job failed (``worker.liveness``). Either way the marker would refuse the next enqueue for its
    hour (a marker dropped while its job is in a worker's hands costs a duplicate job, which finds
    nothing to do)."""
    waiting: set[str] = set()
    for q in queues(redis, prefix):
        waiting |= {*q.get_job_ids(), *q.scheduled_job_registry.get_job_ids(),
                    *q.started_job_registry.get_job_ids(cleanup=False)}
    dropped = []
    for key in redis.scan_iter(match=f"{prefix}*:queued:*", count=500):
        job_id: Any = redis.get(key)
        if job_id is not None and job_id.decode() not in waiting and delete_if_equal(redis, key, job_id):
            dropped.append(key.decode() if isinstance(key, bytes) else key)
    return dropped


def enqueue_purge(redis: Redis, prefix: str) -> None:
    queue(redis, prefix).enqueue(PURGE_TASK, job_timeout=3600, result_ttl=3600, description="purge deleted data")


def publish(redis: Redis, prefix: str, event: dict[str, Any]) -> None:
    redis.publish(Names(prefix).events, json.dumps(event))


def live_workers(redis: Redis, prefix: str) -> set[str]:
    """Names of the workers whose heartbeat key exists (``worker.liveness``), not RQ's registrations."""
    pattern = Names(prefix).heartbeat("*")
    start = len(pattern) - 1
    return {(key.decode() if isinstance(key, bytes) else key)[start:]
            for key in redis.scan_iter(match=pattern, count=500)}


def queue_status(redis: Redis, prefix: str) -> dict[str, int]:
    return {"depth": sum(q.count for q in queues(redis, prefix)), "workers": len(live_workers(redis, prefix))}
