"""``/admin/*`` (bearer token): parse, call the admin service (``service.py``), answer."""

from typing import Annotated

from fastapi import APIRouter, Path

from service.admin import service
from service.admin.schemas import AdminStatus, RetrainAccepted
from service.deps import AdminDep, GatewayDep, ReplicaDep, SessionDep
from service.schemas import SHARD_MAX, error_responses

router = APIRouter(prefix="/admin", tags=["admin"], responses=error_responses(401, 403, 413, 429, 503))


@router.get("/status", response_model=AdminStatus)
def status(_: AdminDep, session: SessionDep, gateway: GatewayDep, replica: ReplicaDep) -> AdminStatus:
    """Shards (state, version, samples, manifest), the retrain queue, deletions by status, the base model,
    and the attention in use (its temperature and how many validation samples it weighs over)."""
    return service.status(session=session, replica=replica, redis=gateway.redis)


@router.post("/shards/{shard}/retrain", status_code=202, response_model=RetrainAccepted,
             responses=error_responses(404, 409, 422, _404="No such shard", _409="Nothing to retrain"))
def retrain(shard: Annotated[int, Path(ge=0, le=SHARD_MAX, examples=[0])], _: AdminDep, session: SessionDep,
            gateway: GatewayDep) -> RetrainAccepted:
    """Try a failed (or dirty) shard's retrain again."""
    return service.retrain(session=session, redis=gateway.redis, settings=gateway.settings, shard=shard)
