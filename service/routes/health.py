from dataclasses import asdict

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from apa.ledger import repository
from service.deadline import STANCE_LEVEL
from service.deps import GatewayDep, SessionDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. On the event loop: never waits for the thread pool, the ledger or the model."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(gateway: GatewayDep, response: Response) -> Health:
    """Ledger, Redis and engine are ready."""
    checks = {}
    try:
        with gateway.sessions() as session:
            session.execute(text("SELECT 1"))
        checks["ledger"] = "ok"
    except Exception as exc:
        checks["ledger"] = type(exc).__name__
    try:
        gateway.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = type(exc).__name__
    serving = gateway.serving
    checks["engine"] = "ok" if serving is not None and serving.engine.live() else "not loaded"
    ok = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ok else 503
    return Health(status="ok" if ok else "unavailable", checks=checks)


@router.get("/metrics", include_in_schema=False)
def metrics(gateway: GatewayDep, session: SessionDep) -> Response:
    for status, count in repository.deletion_counts(session=session).items():
        gateway.metrics.deletions.labels(status=status).set(count)
    if gateway.serving is not None:
        for stat, value in asdict(gateway.serving.engine.prefixes.stats()).items():
            gateway.metrics.prefix_cache.labels(stat=stat).set(value)
        deadline, metrics = gateway.serving.deadline, gateway.metrics
        metrics.forget_waited.set(deadline.waited_s() or 0.0)
        metrics.forget_overdue.set(deadline.overdue())
        metrics.forget_stance.set(STANCE_LEVEL[deadline.stance()])
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
