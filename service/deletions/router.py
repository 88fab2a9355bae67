"""``DELETE /users/{user_id}/interactions`` and ``GET /deletions/{request_id}``: parse, call the
deletion service (``service.py``), shape the answer."""

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response

from ledger import deletions
from ledger.models import DeletionRequest, as_utc
from service.deadline import Policy
from service.deletions.schemas import DeletionAccepted, DeletionRequestPublic
from service.deletions.service import DeletionService
from service.deps import AdminDep, GatewayDep, ReplicaDep, SessionDep
from service.schemas import MAX_ITEMS, IdParam, error_responses

router = APIRouter(tags=["deletions"])


def get_deletion_service(gateway: GatewayDep, replica: ReplicaDep) -> DeletionService:
    return DeletionService(settings=gateway.settings, replica=replica, redis=gateway.redis, metrics=gateway.metrics)


DeletionServiceDep = Annotated[DeletionService, Depends(get_deletion_service)]


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
    service: DeletionServiceDep,
    item_id: Annotated[list[IdParam] | None, Query(max_length=MAX_ITEMS,
                                                   description="Only these items (repeat the parameter)")] = None,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> DeletionAccepted:
    """Forget a user's interactions (all, or some items): quarantine at once, retrain in the background.

    The affected shards leave serving in the same transaction that records the request; the first
    status is ``quarantined`` (``completed`` when no shard saw the data). Follow ``Location``.
    """
    received = time.perf_counter()
    request = service.request(session=session, user_id=user_id, item_ids=item_id, token_hmac=token_hmac,
                              idempotency_key=idempotency_key, received=received)
    response.headers["Location"] = f"/deletions/{request.id}"
    return DeletionAccepted(request_id=request.id, status=request.status,  # type: ignore[arg-type]
                            affected_shards=list(request.affected_shards))


@router.get("/deletions/{request_id}", response_model=DeletionRequestPublic,
            responses=error_responses(404, 413, 422, 503, _404="No such request"))
def get_deletion(request_id: Annotated[IdParam, Path()], session: SessionDep, gateway: GatewayDep,
                 ) -> DeletionRequestPublic:
    """A deletion request's status and, once completed, its certificate; ``overdue`` past APA_FORGET_DEADLINE_S."""
    return _public(deletions.get_deletion(session=session, request_id=request_id),
                   gateway.settings.forget_policy())
