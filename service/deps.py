"""Typed dependencies: routes read as type signatures."""

import hmac
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from apa.hashing import hmac_hex
from service.limits import RateLimiter, retry_after
from service.metrics import Metrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from jobs.periodic import Periodic
    from service.recommend.service import Recommender
    from service.replica import Replica


@dataclass
class Gateway:
    """Everything the app built at start-up (``app.state.gateway``)."""

    settings: ServiceSettings
    sessions: sessionmaker[Session]
    metrics: Metrics
    replica: "Replica | None" = None
    recommender: "Recommender | None" = None
    redis: Any = None
    threads: "list[Periodic]" = field(default_factory=list)  # the event listener and the ledger poll
    limiter: RateLimiter | None = None  # per-token rate limits, shared by the replicas through Redis
    probes: ThreadPoolExecutor = field(  # /readyz's checks: never queued behind the request thread pool
        default_factory=lambda: ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe"))


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def get_session(gateway: GatewayDep) -> Iterator[Session]:
    with gateway.sessions() as session:
        try:
            yield session
        except Exception:
            session.rollback()
            raise


SessionDep = Annotated[Session, Depends(get_session)]

_bearer = HTTPBearer(auto_error=False, description="APA_ADMIN_TOKEN")


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str:
    """The bearer token the request presents; 401 without one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return credentials.credentials


def require_admin(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """401 without a bearer token, 403 with a wrong one, 429 over the token's rate; returns the token's
    HMAC (it scopes idempotency and the rate limit)."""
    token = _presented(credentials)
    expected = gateway.settings.admin_token
    if expected is None or not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise HTTPException(403, "wrong token")
    token_hmac = hmac_hex(gateway.settings.hmac_secret(), "token", token)
    _limit(gateway, "admin", token_hmac, rate=gateway.settings.admin_rate_per_s, burst=gateway.settings.admin_burst)
    return token_hmac


def _limit(gateway: Gateway, name: str, token_hmac: str, *, rate: float, burst: int) -> None:
    """429 with Retry-After past the token's rate (one limit across every replica)."""
    if gateway.limiter is None:
        return
    wait_s = gateway.limiter.take(name, token_hmac, rate=rate, burst=burst)
    if wait_s:
        raise HTTPException(429, "too many requests with this token; slow down", headers=retry_after(wait_s))


AdminDep = Annotated[str, Depends(require_admin)]

_ingest_bearer = HTTPBearer(auto_error=False, description="APA_INGEST_TOKEN or APA_ADMIN_TOKEN")


def require_ingest(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_ingest_bearer)],
) -> str:
    """``APA_INGEST_TOKEN`` or the admin token (compared in constant time): 401 without a bearer token, 403
    with another, 429 over the ingestion rate of that token; returns the token's HMAC."""
    given = _presented(credentials).encode()
    settings = gateway.settings
    allowed = [t for t in (settings.ingest_token, settings.admin_token) if t is not None]
    if not sum(hmac.compare_digest(given, token.get_secret_value().encode()) for token in allowed):
        raise HTTPException(403, "wrong token")
    token_hmac = hmac_hex(settings.hmac_secret(), "token", given.decode())
    _limit(gateway, "ingest", token_hmac, rate=settings.ingest_rate_per_s, burst=settings.ingest_burst)
    return token_hmac


IngestDep = Annotated[str, Depends(require_ingest)]

_client_bearer = HTTPBearer(auto_error=False, description="APA_RECOMMEND_TOKEN, when the gateway sets one")


def require_client(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_client_bearer)],
) -> None:
    """With ``APA_RECOMMEND_TOKEN`` set: 401 without a bearer token, 403 unless it is that token or the
    admin token (compared in constant time). Unset: anyone may ask."""
    expected = gateway.settings.recommend_token
    if expected is None:
        return
    given = _presented(credentials).encode()
    admin = gateway.settings.admin_token
    allowed = [expected] + ([admin] if admin is not None else [])
    # every comparison runs, so the time does not tell which token was close
    if not sum(hmac.compare_digest(given, token.get_secret_value().encode()) for token in allowed):
        raise HTTPException(403, "wrong token")


ClientDep = Depends(require_client)


def get_replica(gateway: GatewayDep) -> "Replica":
    if gateway.replica is None:
        raise HTTPException(503, "the engine is not loaded", headers=retry_after(5))
    return gateway.replica


def get_recommender(gateway: GatewayDep) -> "Recommender":
    if gateway.recommender is None:
        raise HTTPException(503, "the engine is not loaded", headers=retry_after(5))
    return gateway.recommender


ReplicaDep = Annotated["Replica", Depends(get_replica)]
RecommenderDep = Annotated["Recommender", Depends(get_recommender)]
