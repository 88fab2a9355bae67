"""The worker's Prometheus metrics: retrains by outcome, retrain seconds, purges, the queue's depth.

Served on ``APA_WORKER_METRICS_PORT`` (0, the default, serves none: two workers on one host would
need two ports) at ``/metrics``; the queue depth is read from Redis at each scrape.
"""

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from jobs import queue

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
RETRAINS = Counter("apa_worker_retrains_total", "Retrain jobs by outcome: published, failed (after retries or "
                   "a refused gate), retried (raised; RQ runs it again), busy (another worker held the shard), "
                   "clean (nothing to do)", ["outcome"], registry=REGISTRY)
RETRAIN_SECONDS = Histogram("apa_worker_retrain_seconds", "Seconds from snapshot to published or failed",
                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600), registry=REGISTRY)
PURGES = Counter("apa_worker_purges_total", "Deletion requests whose data was purged from the run folder",
                 registry=REGISTRY)


class QueueDepth(Collector):
    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis, self.prefix = redis, prefix

    def collect(self):  # type: ignore[no-untyped-def]  # prometheus_client's own signature
        family = GaugeMetricFamily("apa_worker_queue_depth", "Jobs waiting in the retrain queue")
        try:
            family.add_metric([], queue.queue(self.redis, self.prefix).count)
        except RedisError:
            return  # no sample rather than a wrong one
        yield family


def serve(port: int, redis: Redis, prefix: str) -> QueueDepth:
    """Start the metrics endpoint on ``port`` (a daemon thread), with the queue depth of ``prefix``;
    returns that collector (``REGISTRY.unregister`` removes it)."""
    depth = QueueDepth(redis, prefix)
    REGISTRY.register(depth)
    start_http_server(port, registry=REGISTRY)
    log.info("worker metrics on port %d", port)
    return depth
