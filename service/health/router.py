import asyncio
from collections.abc import Callable
from dataclasses import asdict

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from ledger import catalog
from service.deadline import STANCE_LEVEL
from service.deps import Gateway, GatewayDep, SessionDep
from service.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. On the event loop: never waits on the model, the ledger or the thread pool."""
    return Health(status="ok")


def _ledger_check(gateway: Gateway) -> None:
    with gateway.sessions() as session:
        session.execute(text("SELECT 1"))


def _redis_check(gateway: Gateway) -> None:
    gateway.redis.ping()


async def _probe(gateway: Gateway, check: Callable[[Gateway], None]) -> str:
    """``ok``, the error's class name, or ``timeout`` after ``APA_PROBE_TIMEOUT_S``."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(gateway.probes, check, gateway), gateway.settings.probe_timeout_s)
    except TimeoutError:
        return "timeout"
    except Exception as exc:
        return type(exc).__name__
    return "ok"


@router.get("/readyz", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
async def readyz(gateway: GatewayDep, response: Response) -> Health:
    """Ledger, Redis and engine are ready (each check bounded by ``APA_PROBE_TIMEOUT_S``)."""
    ledger, redis = await asyncio.gather(_probe(gateway, _ledger_check), _probe(gateway, _redis_check))
    serving = gateway.serving
    checks = {"ledger": ledger, "redis": redis,
              "engine": "ok" if serving is not None and serving.engine.live() else "not loaded"}
    ok = all(v == "ok" for v in checks.values())
    response.status_code = 200 if ok else 503
    if not ok:
        response.headers["Retry-After"] = "5"
    return Health(status="ok" if ok else "unavailable", checks=checks)


@router.get("/metrics", include_in_schema=False)
def metrics(gateway: GatewayDep, session: SessionDep) -> Response:
    for status, count in catalog.deletion_counts(session=session).items():
        gateway.metrics.deletions.labels(status=status).set(count)
    if gateway.serving is not None:
        for stat, value in asdict(gateway.serving.engine.prefixes.stats()).items():
            gateway.metrics.prefix_cache.labels(stat=stat).set(value)
        deadline, metrics = gateway.serving.deadline, gateway.metrics
        metrics.forget_waited.set(deadline.waited_s() or 0.0)
        metrics.forget_overdue.set(deadline.overdue())
        metrics.forget_stance.set(STANCE_LEVEL[deadline.stance()])
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)
