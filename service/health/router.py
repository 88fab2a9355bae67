"""``/healthz``, ``/readyz`` and ``/metrics``."""

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import GatewayDep, SessionDep
from service.health import service
from service.health.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. On the event loop: never waits on the model, the ledger or the thread pool."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(gateway: GatewayDep, response: Response) -> Health:
    """Ledger, Redis and engine are ready (each check bounded by ``APA_PROBE_TIMEOUT_S``)."""
    checks = await service.readiness(gateway)
    ok = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ok else 503
    if not ok:
        response.headers["Retry-After"] = "5"
    return Health(status="ok" if ok else "unavailable", checks=checks)


@router.get("/metrics", include_in_schema=False)
def metrics(gateway: GatewayDep, session: SessionDep) -> Response:
    service.refresh_gauges(gateway, session)
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
