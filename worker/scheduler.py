"""RQ's scheduler, which moves the jobs ``rq.Retry`` delays back to their queue, as a thread of the
worker process.

RQ runs it in a forked child of the worker (``work(with_scheduler=True)``). A SIGKILL of the worker
left that child running (21 minutes and 438 MB seen), reparented to init and holding the scheduler
lock, so no later worker scheduled anything and failed retrains were never retried (issue 26). As a
thread it dies with its process. Its lock names the worker (the scheduler's name is the worker's), so
the liveness pass frees the lock of a worker without a heartbeat at once, not after the lock's 61 s.
"""

import contextlib
import logging

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.scheduler import RQScheduler

from jobs.periodic import Periodic

log = logging.getLogger(__name__)


class Scheduler(Periodic):
    """Every ``interval_s``: take or refresh the scheduler lock of each queue (another live worker may
    hold it), then enqueue the held queues' jobs that are due. ``stop()`` releases the locks."""

    def __init__(self, redis: Redis, queues: list[Queue], name: str, interval_s: int = 1) -> None:
        super().__init__("rq-scheduler", self.schedule, interval_s)
        self.rq = RQScheduler(queues, connection=redis, name=name, interval=interval_s)
        self.registered = False

    def schedule(self) -> None:
        """One round (the thread runs one every ``interval_s``)."""
        try:
            self._schedule()
        except RedisError:  # Redis down: the heartbeat says so; the lock expires and is taken again after
            log.debug("scheduler: Redis unavailable", exc_info=True)

    def _schedule(self) -> None:
        if not self.rq.acquire_locks():
            return
        if self.registered:
            self.rq.heartbeat()
        else:
            self.rq.register_birth()
            self.registered = True
        self.rq.enqueue_scheduled_jobs()

    def stop(self) -> None:
        super().stop()
        if self.ident is not None:  # started (a burst worker runs one round without the thread)
            self.join(timeout=5)
        with contextlib.suppress(RedisError):
            self.rq.release_locks()
            if self.registered:
                self.rq.register_death()


def lock_key(queue_name: str) -> str:
    """The Redis key of a queue's scheduler lock; its value is the holding scheduler's (worker's) name."""
    return str(RQScheduler.get_locking_key(queue_name))
