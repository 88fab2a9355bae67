"""Queue priority: deletions' retrains are taken before ingestion's, and neither's marker hides the other."""

from redis import Redis

from apa.settings import CoreSettings
from jobs import queue
from tests.conftest import REDIS_URL


def test_a_deletion_is_not_hidden_behind_a_queued_ingestion_retrain(redis_prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    settings = CoreSettings(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    try:
        assert queue.enqueue_retrain(redis, settings, 0, queue.INGESTION)
        assert not queue.enqueue_retrain(redis, settings, 0, queue.INGESTION), "one waiting per priority"
        assert queue.enqueue_retrain(redis, settings, 0), "a deletion's retrain is queued all the same"
        first, second = queue.queues(redis, redis_prefix)
        assert (first.count, second.count) == (1, 1)
        assert first.name == f"{redis_prefix}retrain", "workers empty the deletions' queue first"
        assert queue.queue_status(redis, redis_prefix)["depth"] == 2
        queue.clear_queued(redis, redis_prefix, 0)  # a retrain of shard 0 started: it covers both
        assert queue.enqueue_retrain(redis, settings, 0, queue.INGESTION) and queue.enqueue_retrain(redis, settings, 0)
        assert queue.enqueue_prepare(redis, redis_prefix) and not queue.enqueue_prepare(redis, redis_prefix)
    finally:
        for q in queue.queues(redis, redis_prefix):
            q.empty()
        redis.close()
