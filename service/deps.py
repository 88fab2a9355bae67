"""Typed dependencies: routes read as type signatures."""

import hmac
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from apa.ledger.repository import hmac_hex
from service.metrics import Metrics
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.recommender import Recommender
    from service.serving import Serving


@dataclass
class Gateway:
    """Everything the app built at start-up (``app.state.gateway``)."""

    settings: ServiceSettings
    sessions: sessionmaker[Session]
    metrics: Metrics
    serving: "Serving | None" = None
    recommender: "Recommender | None" = None
    redis: Any = None
    threads: list[Any] = field(default_factory=list)


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


def require_admin(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """401 without a bearer token, 403 with a wrong one; returns the token's HMAC (scopes idempotency)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    expected = gateway.settings.admin_token
    if expected is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                   expected.get_secret_value().encode()):
        raise HTTPException(403, "wrong token")
    return hmac_hex(gateway.settings.hmac_secret(), "token", credentials.credentials)


AdminDep = Annotated[str, Depends(require_admin)]


def get_serving(gateway: GatewayDep) -> "Serving":
    if gateway.serving is None:
        raise HTTPException(503, "the engine is not loaded")
    return gateway.serving


def get_recommender(gateway: GatewayDep) -> "Recommender":
    if gateway.recommender is None:
        raise HTTPException(503, "the engine is not loaded")
    return gateway.recommender


ServingDep = Annotated["Serving", Depends(get_serving)]
RecommenderDep = Annotated["Recommender", Depends(get_recommender)]
