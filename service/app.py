"""The app factory. ``create_app()`` only wires the feature routers; the lifespan builds the engine
(``APA_ENGINE``, by name) and the replica, loads the serving versions from the ledger, and starts
the background loops (pub/sub events, the ledger poll)."""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from apa import __version__
from apa.engines import create_engine
from apa.errors import ConfigError
from apa.model import load_base_model
from apa.runs import RunConfig
from jobs import queue
from ledger import run_import
from ledger.db import require_current, session_factory
from ledger.errors import LedgerError
from service import errors, redaction
from service.admin import router as admin
from service.background import EventListener, ledger_poller
from service.deletions import router as deletions
from service.deps import Gateway
from service.health import router as health
from service.ingest import router as ingest
from service.items import router as items
from service.limits import BodyLimit, RateLimiter
from service.metrics import Metrics
from service.recommend import router as recommend
from service.recommend.service import Recommender
from service.replica import Replica, RunInfo
from service.settings import ServiceSettings, get_service_settings
from service.timeout import RequestTimeout

log = logging.getLogger(__name__)

DESCRIPTION = """LLM recommendations that can be forgotten exactly (APA: Adapter Partition and Aggregation).

`POST /recommend` scores items with one forward pass through the per-user mixture of K shard LoRAs.
`DELETE /users/{id}/interactions` quarantines every shard that saw the data at once; a worker
retrains those shards from scratch and the gateway hot-swaps them; `GET /deletions/{id}` ends with a
certificate. `POST /users/{id}/interactions` adds what a user rated: the next `/recommend` uses it at
once, and only the shard each new sample joins retrains on it (by count or age). `DELETE`, `PUT /items`
and `/admin/*` need `Authorization: Bearer <APA_ADMIN_TOKEN>`; ingestion takes `APA_INGEST_TOKEN` too."""


def _start(gateway: Gateway) -> None:
    settings = gateway.settings
    require_current(settings.ledger_url)
    with gateway.sessions() as session:
        run = run_import.get_run(session=session)
        info = RunInfo(path=Path(run.path), config=RunConfig.from_dict(run.config))
        expected_sha = run.base_model_sha256
    base = load_base_model(settings.base_model_dir, device=settings.device)
    if base.sha256 != expected_sha:
        raise LedgerError(f"the base model at {settings.base_model_dir} is not the one the run was trained on")
    replica = Replica(settings, base, info, create_engine(settings.engine, base, **settings.engine_options()))

    def observe_completed(seconds: list[float]) -> None:
        for value in seconds:
            gateway.metrics.time_to_forget.observe(value)
            if value > settings.forget_deadline_s:
                gateway.metrics.completed_overdue.inc()

    replica.on_completed = observe_completed
    replica.sync()
    gateway.replica = replica
    gateway.recommender = Recommender(settings, replica, gateway.sessions, gateway.metrics)
    gateway.redis = queue.connect(settings.redis_url)
    gateway.threads = [EventListener(gateway.redis, queue.Names(settings.redis_prefix).events, replica),
                       ledger_poller(replica, settings.poll_interval_s)]
    for thread in gateway.threads:
        thread.start()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    gateway: Gateway = app.state.gateway
    await run_in_threadpool(_start, gateway)
    assert gateway.recommender is not None
    gateway.recommender.start()
    log.info("serving %d shards", len(gateway.replica.engine.live()) if gateway.replica else 0)
    try:
        yield
    finally:
        for thread in gateway.threads:
            thread.stop()
        await gateway.recommender.stop()
        for thread in gateway.threads:
            thread.join(timeout=5)
        if gateway.redis is not None:
            gateway.redis.close()
        if gateway.replica is not None:  # e.g. a vLLM server's adapter slots, for the next gateway
            await run_in_threadpool(gateway.replica.engine.close)
        gateway.probes.shutdown(wait=False, cancel_futures=True)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or get_service_settings()
    if settings.admin_token is None or not settings.admin_token.get_secret_value():
        raise ConfigError("set APA_ADMIN_TOKEN: DELETE and /admin/* need it")
    app = FastAPI(title="APA-Rec", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    sessions = session_factory(settings.ledger_url, **settings.ledger_timeouts())
    app.state.gateway = Gateway(settings=settings, sessions=sessions, metrics=Metrics(),
                                limiter=RateLimiter(settings.redis_url, queue.Names(settings.redis_prefix).rate()))
    app.state.gateway.metrics.forget_deadline.set(settings.forget_deadline_s)
    errors.install(app)
    redaction.install()
    for module in (recommend, ingest, items, deletions, admin, health):
        app.include_router(module.router)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template, not the raw path
        app.state.gateway.metrics.latency.labels(request.method, route, str(response.status_code)).observe(
            time.perf_counter() - started)
        return response

    app.add_middleware(RequestTimeout, timeout_s=settings.request_timeout_s,
                       exempt=("/healthz",))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # outermost: before anything reads the body
    return app
