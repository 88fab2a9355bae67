import logging
import time
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response

from jobs import queue
from ledger import deletions
from ledger.models import DeletionRequest, as_utc
from service.deadline import Policy
from service.deps import AdminDep, GatewayDep, ServingDep, SessionDep
from service.schemas import MAX_ITEMS, DeletionAccepted, DeletionRequestPublic, IdParam, error_responses

log = logging.getLogger(__name__)
router = APIRouter(tags=["deletions"])


def _public(request: DeletionRequest, policy: Policy) -> DeletionRequestPublic:
    created, completed = as_utc(request.created_at), as_utc(request.completed_at)
    return DeletionRequestPublic.model_validate({
        "request_id": request.id, "status": request.status, "affected_shards": request.affected_shards,
        "created_at": created, "completed_at": completed, "certificate": request.certificate, "error": request.error,
        "overdue": created is not None and policy.overdue(created, completed),
    })


@router.delete("/users/{user_id}/interactions", status_code=202, response_model=DeletionAccepted,
               responses=error_responses(
                   401, 403, 404, 409, 413, 422, 429, 503,
                   _404="The user has no live interactions (with those items)",
                   _409="The Idempotency-Key was used for another request (another user or other items)"))
def delete_interactions(
    user_id: Annotated[IdParam, Path()], response: Response, session: SessionDep, token_hmac: AdminDep,
    gateway: GatewayDep, serving: ServingDep,
    item_id: Annotated[list[IdParam] | None, Query(max_length=MAX_ITEMS,
                                                   description="Only these items (repeat the parameter)")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> DeletionAccepted:
    """Forget a user's interactions (all, or some items): quarantine at once, retrain in the background.

    The affected shards leave serving in the same transaction that records the request; the first
    status is ``quarantined`` (``completed`` when no shard saw the data). Follow ``Location``.
    """
    received = time.perf_counter()
    settings = gateway.settings
    outcome = deletions.request_deletion(
        session=session, user_id=user_id, item_ids=item_id, key=settings.hmac_secret(),
        idempotency_key=idempotency_key, token_hmac=token_hmac)
    request = outcome.request
    if outcome.created:
        serving.drop_valid(outcome.valid_sample_ids)
        with serving.quarantined_until_committed(request.affected_shards):  # before the commit: the safe side
            session.commit()
        serving.forget_user(user_id)
        gateway.metrics.time_to_quarantine.observe(time.perf_counter() - received)
        gateway.metrics.deletion_requests.labels(first_status=request.status).inc()
        _wake_worker(gateway, request)
    response.headers["Location"] = f"/deletions/{request.id}"
    return DeletionAccepted(request_id=request.id, status=request.status,  # type: ignore[arg-type]
                            affected_shards=list(request.affected_shards))


def _wake_worker(gateway: GatewayDep, request: DeletionRequest) -> None:
    """Enqueue the retrains and publish the quarantine; if Redis is down the reconciler catches up."""
    settings = gateway.settings
    try:
        for shard in request.affected_shards:
            queue.enqueue_retrain(gateway.redis, settings, shard)
        if request.affected_shards:
            # the user by the ledger's HMAC only: other replicas drop their cached history with it
            queue.publish(gateway.redis, settings.redis_prefix, {
                "type": "quarantine", "shards": list(request.affected_shards), "subject": request.subject_hmac})
        else:
            queue.enqueue_purge(gateway.redis, settings.redis_prefix)
    except Exception:
        log.warning("deletion %s recorded, but Redis is unavailable: the worker's reconciler will pick it up",
                    request.id, exc_info=True)


@router.get("/deletions/{request_id}", response_model=DeletionRequestPublic,
            responses=error_responses(404, 413, 422, 503, _404="No such request"))
def get_deletion(request_id: Annotated[IdParam, Path()], session: SessionDep, gateway: GatewayDep,
                 ) -> DeletionRequestPublic:
    """A deletion request's status and, once completed, its certificate; ``overdue`` past APA_FORGET_DEADLINE_S."""
    return _public(deletions.get_deletion(session=session, request_id=request_id),
                   gateway.settings.forget_policy())
