"""Readiness probes and the gauges ``/metrics`` reads fresh on every scrape."""

import asyncio
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session

from ledger import catalog
from service.deadline import STANCE_LEVEL
from service.deps import Gateway


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


async def readiness(gateway: Gateway) -> dict[str, str]:
    """Each check -> ``ok`` or why not: the ledger and Redis (on their own threads, bounded), the engine."""
    ledger, redis = await asyncio.gather(_probe(gateway, _ledger_check), _probe(gateway, _redis_check))
    replica = gateway.replica
    return {"ledger": ledger, "redis": redis,
            "engine": "ok" if replica is not None and replica.engine.live() else "not loaded"}


def refresh_gauges(gateway: Gateway, session: Session) -> None:
    """Deletions by status (ledger), the engine's caches and the time-to-forget stance (this replica)."""
    metrics = gateway.metrics
    for status, count in catalog.deletion_counts(session=session).items():
        metrics.deletions.labels(status=status).set(count)
    if gateway.replica is not None:
        for stat, value in gateway.replica.engine.cache_stats().items():
            metrics.prefix_cache.labels(stat=stat).set(value)
        deadline = gateway.replica.deadline
        metrics.forget_waited.set(deadline.waited_s() or 0.0)
        metrics.forget_overdue.set(deadline.overdue())
        metrics.forget_stance.set(STANCE_LEVEL[deadline.stance()])
