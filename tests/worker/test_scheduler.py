"""RQ's scheduler as a thread of the worker: it moves due jobs back to their queue under a lock that
names the worker, releases the lock on a stop, and a dead worker's lock is freed by the liveness pass."""

from collections.abc import Iterator
from datetime import timedelta

import pytest
from redis import Redis

from jobs import queue
from tests.conftest import REDIS_URL
from tests.support.faults import wait_until
from worker.liveness import Heartbeat, recover_orphans
from worker.scheduler import Scheduler, lock_key


@pytest.fixture
def redis(redis_prefix: str) -> Iterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    client.delete(*[lock_key(q.name) for q in queue.queues(client, redis_prefix)])
    client.close()


def test_the_scheduler_thread_enqueues_due_jobs_under_a_lock_named_for_its_worker(
        redis: Redis, redis_prefix: str) -> None:
    queues = queue.queues(redis, redis_prefix)
    job = queues[0].enqueue_in(timedelta(seconds=1), queue.PURGE_TASK)  # as rq.Retry delays a retrain
    assert queues[0].count == 0
    scheduler = Scheduler(redis, queues, "worker-a")
    scheduler.start()
    try:
        wait_until(lambda: job.id in queues[0].job_ids, 10, "the due job back in its queue")
        assert [redis.get(lock_key(q.name)) for q in queues] == [b"worker-a", b"worker-a"]
        second = Scheduler(redis, queues, "worker-b")  # another worker finds the locks held
        second.schedule()
        assert not second.rq.acquired_locks
    finally:
        scheduler.stop()
        job.delete()
    assert not scheduler.is_alive()
    assert [redis.exists(lock_key(q.name)) for q in queues] == [0, 0], "released on a stop"


def test_a_dead_workers_scheduler_lock_is_freed_a_live_ones_kept(redis: Redis, redis_prefix: str) -> None:
    retrain, ingest = queue.queues(redis, redis_prefix)
    Heartbeat(redis, redis_prefix, "alive", ttl_s=30).beat()
    redis.set(lock_key(retrain.name), "dead", ex=60)  # a SIGKILLed worker's: it would last 60 s more
    redis.set(lock_key(ingest.name), "alive", ex=60)
    assert recover_orphans(redis, redis_prefix)["freed_locks"] == [lock_key(retrain.name)]
    assert not redis.exists(lock_key(retrain.name)) and redis.get(lock_key(ingest.name)) == b"alive"
    scheduler = Scheduler(redis, [retrain], "alive")
    scheduler.schedule()  # the next live worker takes it at its next round
    assert redis.get(lock_key(retrain.name)) == b"alive"
    scheduler.stop()
