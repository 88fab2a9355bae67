"""The worker process's RQ worker: it waits for a job in shorter BLPOPs than its connections time out in."""

from jobs import queue
from tests.conftest import REDIS_URL
from worker.main import Worker


def test_an_idle_workers_wait_for_a_job_ends_before_its_connection_times_out(redis_prefix: str) -> None:
    redis = queue.connect(REDIS_URL)
    redis.ping()  # a pooled connection made with the 10 s socket timeout, before RQ raises the pool's
    worker = Worker(queue.queues(redis, redis_prefix), connection=redis, name="idle")
    assert worker.dequeue_timeout < queue.SOCKET_TIMEOUT_S
    assert worker.dequeue_job_and_maintain_ttl(worker.dequeue_timeout, max_idle_time=worker.dequeue_timeout) is None
    redis.close()
