import logging
from typing import Annotated

from fastapi import APIRouter, Path

from jobs import queue
from ledger import catalog, retrains
from service.deps import AdminDep, GatewayDep, ServingDep, SessionDep
from service.schemas import (
    SHARD_MAX,
    AdminStatus,
    AttentionSetting,
    AttentionStatus,
    ForgetStatus,
    ModelInfo,
    QueueStatus,
    RetrainAccepted,
    ShardStatus,
    error_responses,
)
from service.serving import Serving

log = logging.getLogger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"], responses=error_responses(401, 403, 413, 429, 503))


@router.get("/status", response_model=AdminStatus)
def status(_: AdminDep, session: SessionDep, gateway: GatewayDep, serving: ServingDep) -> AdminStatus:
    """Shards (state, version, samples, manifest), the retrain queue, deletions by status, the base model,
    and the attention in use (its temperature and how many validation samples it weighs over)."""
    shards = [ShardStatus(shard=v.shard, state=v.state, version=v.version,  # type: ignore[arg-type]
                          n_samples=v.n_samples, trained_at=v.trained_at, manifest_sha256=v.manifest_sha256)
              for v in catalog.shard_views(session=session)]
    try:
        queue_state = QueueStatus(**queue.queue_status(gateway.redis, gateway.settings.redis_prefix))
    except Exception:
        log.warning("queue status unavailable", exc_info=True)
        queue_state = QueueStatus(depth=None, workers=None)
    settings, attention = serving.settings, serving.attention
    return AdminStatus(shards=shards, queue=queue_state, deletions=catalog.deletion_counts(session=session),
                       model=ModelInfo(name=serving.base.name, sha256=serving.base.sha256),
                       attention=AttentionStatus(
                           mode=settings.mode,
                           configured=AttentionSetting(error=settings.attention_error, knn=settings.knn,
                                                       tau=settings.tau),
                           in_use=AttentionSetting(**attention.setting.as_dict()) if attention else None,
                           loo_valid_auc=round(attention.choice.valid_auc, 4) if attention and attention.choice
                           else None,
                           validation_samples=len(attention.memory.sample_ids) if attention else 0),
                       forget=forget_status(serving))


def forget_status(serving: Serving) -> ForgetStatus:
    deadline = serving.deadline
    waited = deadline.waited_s()
    return ForgetStatus(deadline_s=deadline.policy.deadline_s,
                        oldest_open_s=None if waited is None else round(waited, 3),
                        overdue=deadline.overdue(), stance=deadline.stance())


@router.post("/shards/{shard}/retrain", status_code=202, response_model=RetrainAccepted,
             responses=error_responses(404, 409, 422, _404="No such shard", _409="Nothing to retrain"))
def retrain(shard: Annotated[int, Path(ge=0, le=SHARD_MAX)], _: AdminDep, session: SessionDep,
            gateway: GatewayDep) -> RetrainAccepted:
    """Try a failed (or dirty) shard's retrain again."""
    retrains.request_retrain(session=session, shard=shard)
    session.commit()
    settings = gateway.settings
    enqueued = queue.enqueue_retrain(gateway.redis, settings, shard)
    return RetrainAccepted(shard=shard, enqueued=enqueued)
