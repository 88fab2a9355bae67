"""Queue names, de-duplicated enqueueing, per-shard locks and pub/sub. Shared by gateway and worker.

Imports no torch and neither ``service`` nor ``worker``: the gateway enqueues jobs by dotted name
(``worker.tasks.retrain_shard``).

De-duplication: enqueueing a shard's retrain sets ``<prefix>retrain:queued:<k>`` (SET NX); the job
clears it when it starts, before it snapshots the shard. A deletion that finds the marker set is
covered by the queued job; one that arrives after the snapshot enqueues the next retrain.
"""

import json
import logging
from typing import Any

from redis import Redis
from rq import Queue, Retry

from apa.settings import CoreSettings

log = logging.getLogger(__name__)

RETRAIN_TASK = "worker.tasks.retrain_shard"
PURGE_TASK = "worker.tasks.purge_completed"
MARKER_TTL_S = 3600  # a queued job lost without running frees its shard after this


class Names:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @property
    def queue(self) -> str:
        return f"{self.prefix}retrain"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def queued(self, shard: int) -> str:
        return f"{self.prefix}retrain:queued:{shard}"

    def lock(self, shard: int | str) -> str:
        return f"{self.prefix}retrain:lock:{shard}"

    def heartbeat(self, worker: str) -> str:
        """A live worker's key (``worker.liveness``); ``*`` gives the pattern of all of them."""
        return f"{self.prefix}worker:{worker}"


def connect(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=30)


def queue(redis: Redis, prefix: str) -> Queue:
    return Queue(Names(prefix).queue, connection=redis)


def retry_policy(attempts: int, backoff_s: float) -> Retry | None:
    """RQ's retry of a job that raised: ``attempts`` runs in all, waiting backoff_s, 2 x backoff_s, ..."""
    if attempts <= 1:
        return None
    return Retry(max=attempts - 1, interval=[round(backoff_s * 2 ** i) for i in range(attempts - 1)])


def enqueue_retrain(redis: Redis, settings: CoreSettings, shard: int) -> bool:
    """Enqueue one retrain of ``shard`` unless one is already waiting, with the settings' job timeout and
    RQ retry (see :func:`retry_policy`). Returns whether it enqueued."""
    prefix = settings.redis_prefix
    names = Names(prefix)
    if not redis.set(names.queued(shard), "1", nx=True, ex=MARKER_TTL_S):
        return False
    try:
        queue(redis, prefix).enqueue(RETRAIN_TASK, shard, job_timeout=settings.retrain_timeout_s, result_ttl=3600,
                                     failure_ttl=7 * 86400, description=f"retrain shard {shard}",
                                     retry=retry_policy(settings.max_attempts, settings.backoff_s))
    except Exception:
        redis.delete(names.queued(shard))
        raise
    log.info("enqueued retrain of shard %d", shard)
    return True


def clear_queued(redis: Redis, prefix: str, shard: int) -> None:
    redis.delete(Names(prefix).queued(shard))


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
    return {"depth": queue(redis, prefix).count, "workers": len(live_workers(redis, prefix))}
