"""Which workers are alive, judged by a heartbeat key, and what to do with the work of a dead one.

RQ's own registration cannot answer this truthfully: a SIGKILLed worker stays registered until its
key expires (minutes), a Redis flush erases every live worker's registration for good (RQ only
refreshes the TTL of a key that exists), and the killed worker's job stays in the started registry
until its timeout (hours). So each worker process SETs ``<prefix>worker:<name>`` with a short TTL
from a thread of its own; SET re-creates the key after a flush, and the key vanishes ``ttl`` seconds
after a SIGKILL. The gateway counts these keys; the reconciler fails the started jobs of workers
whose key is gone and frees the shard locks they held (a lock's token names its owner), so the
ledger's dirty shard is enqueued again at once instead of after the lock's TTL; and it frees their
scheduler locks (``worker.scheduler``: the lock holds the worker's name), so a live worker schedules
the retries' backoff at once.

Imports no torch: the gateway counts workers with ``queue.live_workers``.
"""

import contextlib
import json
import logging
import os
import secrets
import socket
import time
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry

from jobs.periodic import Periodic
from jobs.queue import Names, delete_if_equal, live_workers, queue, queues
from worker.scheduler import lock_key

log = logging.getLogger(__name__)

OWNER_SEPARATOR = "/"  # a lock token is "<worker name>/<random>"


def worker_name() -> str:
    """Unique per process and readable in logs: host, pid and a random tail."""
    return f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(3)}"


def lock_token(owner: str) -> str:
    return f"{owner}{OWNER_SEPARATOR}{secrets.token_hex(8)}" if owner else secrets.token_hex(8)


def lock_owner(token: bytes | str) -> str:
    text = token.decode() if isinstance(token, bytes) else token
    owner, separator, _ = text.rpartition(OWNER_SEPARATOR)
    return owner if separator else ""


class Heartbeat(Periodic):
    """SET ``<prefix>worker:<name>`` EX ``ttl_s`` every ``ttl_s / 3`` seconds; DEL on a clean stop."""

    def __init__(self, redis: Redis, prefix: str, name: str, ttl_s: float) -> None:
        super().__init__("worker-heartbeat", self._beat_or_warn, ttl_s / 3)
        self.redis, self.key, self.ttl_s = redis, Names(prefix).heartbeat(name), ttl_s
        self.value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})

    def beat(self) -> None:
        self.redis.set(self.key, self.value, px=max(1, int(self.ttl_s * 1000)))

    def _beat_or_warn(self) -> None:
        try:
            self.beat()
        except RedisError:  # Redis down: the key expires and the worker counts as gone, which it is for Redis
            log.warning("heartbeat: Redis unavailable", exc_info=True)

    def stop(self) -> None:
        super().stop()
        self.join(timeout=5)
        with contextlib.suppress(RedisError):
            self.redis.delete(self.key)


def recover_orphans(redis: Redis, prefix: str) -> dict[str, list[str]]:
    """Fail the started jobs and free the locks (shard, purge, scheduler) of workers without a heartbeat.

    A job is judged by its own worker (``job.worker_name``); jobs of a worker without a name are left
    alone. The retrain itself is not lost: its shard is still dirty in the ledger, so the caller's
    reconcile round enqueues it again once the lock is free (and the job's de-duplication marker, if
    it had not cleared it yet, is dropped: ``jobs.queue.drop_lost_markers``).
    """
    alive = live_workers(redis, prefix)
    names = Names(prefix)
    registry = StartedJobRegistry(queue=queue(redis, prefix))
    failed: list[str] = []
    for job_id, execution_id in registry.get_job_and_execution_ids(cleanup=False):
        try:
            job = Job.fetch(job_id, connection=redis)
        except NoSuchJobError:
            redis.zrem(registry.key, f"{job_id}:{execution_id}")
            continue
        if not job.worker_name or job.worker_name in alive:
            continue
        with redis.pipeline() as pipeline:
            record_job_failure(job, f"worker {job.worker_name} died (no heartbeat)", pipeline)
            pipeline.zrem(registry.key, f"{job_id}:{execution_id}")
            pipeline.execute()
        log.warning("job %s (%s) failed: its worker %s has no heartbeat", job_id, job.description, job.worker_name)
        failed.append(job_id)
    freed: list[str] = []
    held = [(key, lock_owner) for key in redis.scan_iter(match=names.lock("*"), count=500)]
    held += [(lock_key(q.name), _scheduler_owner) for q in queues(redis, prefix)]
    for key, owner_of in held:
        token: Any = redis.get(key)
        owner = owner_of(token) if token is not None else ""
        if owner and owner not in alive and delete_if_equal(redis, key, token):
            name = key.decode() if isinstance(key, bytes) else key
            log.warning("freed %s: its owner %s has no heartbeat", name, owner)
            freed.append(name)
    return {"failed_jobs": failed, "freed_locks": freed}


def _scheduler_owner(token: bytes | str) -> str:
    return token.decode() if isinstance(token, bytes) else token
