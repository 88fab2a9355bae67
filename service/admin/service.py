"""The admin use cases: what this replica and the ledger say about the shards, the queue, the deletions,
the model and the attention; and an admin's retry of a shard's retrain."""

import logging

from redis import Redis
from sqlalchemy.orm import Session

from jobs import queue
from ledger import backlog, catalog, retrains
from service.admin.schemas import (
    AdminStatus,
    AttentionSetting,
    AttentionStatus,
    ForgetStatus,
    IngestStatus,
    ModelInfo,
    QueueStatus,
    RetrainAccepted,
    ShardStatus,
)
from service.replica import Replica
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


def status(*, session: Session, replica: Replica, redis: Redis) -> AdminStatus:
    settings = replica.settings
    waiting = backlog.pending(session=session)
    errors = backlog.ingest_errors(session=session)
    due = {k: backlog.due_at(item, min_samples=settings.ingest_min_samples, max_delay_s=settings.ingest_max_delay_s)
           for k, item in waiting.items()}
    shards = [ShardStatus(shard=v.shard, state=v.state, version=v.version,  # type: ignore[arg-type]
                          n_samples=v.n_samples, trained_at=v.trained_at, manifest_sha256=v.manifest_sha256,
                          pending_samples=waiting[v.shard].samples if v.shard in waiting else 0,
                          next_retrain_due=due.get(v.shard), ingest_error=errors.get(v.shard))
              for v in catalog.shard_views(session=session)]
    try:
        queue_state = QueueStatus(**queue.queue_status(redis, settings.redis_prefix))
    except Exception:
        log.warning("queue status unavailable", exc_info=True)
        queue_state = QueueStatus(depth=None, workers=None)
    return AdminStatus(shards=shards, queue=queue_state, deletions=catalog.deletion_counts(session=session),
                       model=ModelInfo(name=replica.base.name, sha256=replica.base.sha256),
                       attention=attention_status(replica), forget=forget_status(replica),
                       ingest=IngestStatus(min_samples=settings.ingest_min_samples,
                                           max_delay_s=settings.ingest_max_delay_s,
                                           unplaced_samples=backlog.unplaced_count(session=session)))


def attention_status(replica: Replica) -> AttentionStatus:
    settings, in_use = replica.settings, replica.attention.in_use
    return AttentionStatus(
        mode=settings.mode,
        configured=AttentionSetting(error=settings.attention_error, knn=settings.knn, tau=settings.tau),
        in_use=AttentionSetting(**in_use.setting.as_dict()) if in_use else None,
        loo_valid_auc=round(in_use.choice.valid_auc, 4) if in_use and in_use.choice else None,
        validation_samples=len(in_use.memory.sample_ids) if in_use else 0)


def forget_status(replica: Replica) -> ForgetStatus:
    deadline = replica.deadline
    waited = deadline.waited_s()
    return ForgetStatus(deadline_s=deadline.policy.deadline_s,
                        oldest_open_s=None if waited is None else round(waited, 3),
                        overdue=deadline.overdue(), stance=deadline.stance())


def retrain(*, session: Session, redis: Redis, settings: ServiceSettings, shard: int) -> RetrainAccepted:
    """Mark the shard for retraining in the ledger (404 unknown, 409 nothing to do), then enqueue it: with a
    deletion's priority when it holds deleted data, else on the ingestion queue (its pending samples)."""
    retrains.request_retrain(session=session, shard=shard)
    dirty = shard in retrains.dirty_shards(session=session, include_failed=True)
    session.commit()
    priority = queue.DELETION if dirty else queue.INGESTION
    return RetrainAccepted(shard=shard, enqueued=queue.enqueue_retrain(redis, settings, shard, priority))
