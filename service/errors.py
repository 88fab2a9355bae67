"""Domain errors to HTTP answers: each *kind* of ``apa.errors`` maps to one status code (``STATUS``), each
error's message is the answer's detail; the service's own errors are here too.

Every error is a JSON ``{"detail": ...}`` (:class:`service.schemas.ErrorResponse`): a ledger that cannot
be reached is a 503 with ``Retry-After``, an unexpected error a 500 that names nothing of the request.
"""

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from apa.errors import APAError, Conflict, Invalid, NotFound, Unavailable
from service.deadline import LoadShed

log = logging.getLogger(__name__)

STATUS: dict[type[APAError], int] = {NotFound: 404, Conflict: 409, Invalid: 422, Unavailable: 503}  # by kind
RETRY_AFTER_S = 5  # when the ledger is unreachable


class ItemsNotFound(Invalid):
    """Some requested items are not in the catalogue."""

    def __init__(self, item_ids: list[str]) -> None:
        super().__init__(f"unknown item(s): {item_ids}")
        self.item_ids = item_ids


class InteractionKeyTooLong(Invalid):
    """An interaction's key (``<user_id>:<item_id>:<timestamp>``) would not fit the ledger's id columns."""


def status_of(error: type[BaseException]) -> int | None:
    """The status an error answers with: its kind's (None: an error of no kind, a 500)."""
    return next((status for kind, status in STATUS.items() if issubclass(error, kind)), None)


class Overloaded(Exception):
    """Too much work waits already (the model queue is full): 503 with Retry-After, never a queue."""

    retry_after_s = 2


class SafeJSONResponse(JSONResponse):
    """Escapes non-ASCII, so a lone surrogate echoed from the request cannot break the encoding."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error(status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    return SafeJSONResponse(status_code=status, content={"detail": detail}, headers=headers)


def _handler(status: int):  # type: ignore[no-untyped-def]
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ItemsNotFound):
            return error(status, {"message": "unknown item(s)", "unknown_items": exc.item_ids})
        return error(status, str(exc), {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None)

    return handle


async def _shed(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoadShed)
    return error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})


async def _invalid(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error(422, jsonable_encoder(exc.errors()))


async def _overloaded(_request: Request, exc: Exception) -> JSONResponse:
    return error(503, str(exc), {"Retry-After": str(Overloaded.retry_after_s)})


async def _ledger_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # the exception's text holds the SQL, never its parameters (the engine hides them)
    log.warning("ledger unavailable on %s %s: %s", request.method, _route(request), type(exc).__name__)
    return error(503, "the ledger is unavailable; try again later", {"Retry-After": str(RETRY_AFTER_S)})


async def _ledger_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("ledger error on %s %s", request.method, _route(request), exc_info=exc)
    return error(500, "internal error")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s %s", request.method, _route(request), exc_info=exc)
    return error(500, "internal error")


def _route(request: Request) -> str:
    """The route's template (``/users/{user_id}/interactions``), never the raw path with its ids."""
    return getattr(request.scope.get("route"), "path", "unmatched")


def install(app: FastAPI) -> None:
    for domain_error, status in STATUS.items():
        app.add_exception_handler(domain_error, _handler(status))
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(LoadShed, _shed)
    for unavailable in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(unavailable, _ledger_unavailable)
    app.add_exception_handler(DBAPIError, _ledger_error)
    app.add_exception_handler(Exception, _unexpected)
