"""``apa worker``: load the base model once, reconcile, then run an RQ SimpleWorker (no fork per job)."""

import logging
import os

from rq import SimpleWorker

from apa.ledger.db import require_current
from apa.model import load_base_model
from worker import queue
from worker.reconciler import Reconciler, reconcile
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
    set_context(WorkerContext(settings=settings, redis=redis,
                              base=load_base_model(settings.base_model_dir, device=settings.device)))
    reconcile(settings, redis)
    reconciler = Reconciler(settings, redis)
    if not burst:
        reconciler.start()
    try:
        SimpleWorker([queue.queue(redis, settings.redis_prefix)], connection=redis).work(
            burst=burst, logging_level="INFO")
    finally:
        reconciler.stop()
        set_context(None)
