"""``apa worker``: load the base model once, reconcile, then run an RQ SimpleWorker (no fork per job, and
RQ's scheduler as a thread of this process: nothing outlives a killed worker)."""

import logging
import os

from rq import SimpleWorker

from apa.model import load_base_model
from jobs import queue
from ledger.db import require_current
from worker import metrics
from worker.liveness import Heartbeat, worker_name
from worker.reconciler import reconcile, reconciler
from worker.scheduler import Scheduler
from worker.settings import WorkerSettings
from worker.tasks import WorkerContext, set_context

log = logging.getLogger(__name__)


def run(settings: WorkerSettings, *, burst: bool = False) -> None:
    require_current(settings.ledger_url)
    if settings.nice:
        os.nice(settings.nice)
    redis = queue.connect(settings.redis_url)
    redis.ping()
    log.info("loading base model from %s", settings.base_model_dir)
    name = worker_name()
    set_context(WorkerContext(settings=settings, redis=redis, name=name,
                              base=load_base_model(settings.base_model_dir, device=settings.device)))
    if settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_port, redis, settings.redis_prefix)
    heartbeat = Heartbeat(redis, settings.redis_prefix, name, settings.heartbeat_ttl_s)
    heartbeat.beat()  # alive before the first reconcile judges the others
    heartbeat.start()
    queues = queue.queues(redis, settings.redis_prefix)
    reconciling = reconciler(settings, redis, name)
    scheduling = Scheduler(redis, queues, name)  # rq.Retry's backoff
    try:
        reconcile(settings, redis, name)
        scheduling.schedule()  # the jobs already due, before a burst worker looks at its queues
        if not burst:
            reconciling.start()
            scheduling.start()
        Worker(queues, connection=redis, name=name).work(burst=burst, logging_level="INFO")
    finally:
        scheduling.stop()
        reconciling.stop()
        heartbeat.stop()
        set_context(None)


class Worker(SimpleWorker):
    """RQ's SimpleWorker without its command channel: a pubsub thread that listens for the ``rq`` CLI's
    commands (shutdown, kill-horse, stop-job), which this service never sends, holds one more Redis
    connection, and makes every warm stop wait a second for it.

    An idle worker waits for a job in a BLPOP of ``dequeue_timeout`` seconds. RQ's 405 s outlasted the
    10 s socket timeout of connections the pool made before RQ raised it (``jobs.queue.connect``): the
    BLPOP timed out, and RQ took that for a lost Redis and slept 1, 2, 4 ... 60 s between tries, so a
    job enqueued meanwhile waited (seen in bench/chaos.py: a deletion idle for a minute)."""

    @property
    def dequeue_timeout(self) -> int:
        return queue.SOCKET_TIMEOUT_S // 2

    def subscribe(self) -> None:
        pass

    def unsubscribe(self) -> None:
        pass
