"""Domain errors (``apa.errors``) to HTTP answers: each maps to one status code and a clear message."""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError

from apa.errors import (
    APAError,
    DeletionNotFound,
    ItemsNotFound,
    LedgerError,
    NothingToRetrain,
    ShardNotFound,
    UserNotFound,
)
from service.deadline import LoadShed

STATUS: dict[type[APAError], int] = {
    UserNotFound: 404,
    DeletionNotFound: 404,
    ShardNotFound: 404,
    ItemsNotFound: 422,
    NothingToRetrain: 409,
    LedgerError: 503,
}


def _handler(status: int):  # type: ignore[no-untyped-def]
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ItemsNotFound):
            return JSONResponse(status_code=status, content={
                "detail": {"message": "unknown item(s)", "unknown_items": exc.item_ids}})
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return handle


async def _shed(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoadShed)
    return JSONResponse(status_code=503, content={"detail": str(exc)},
                        headers={"Retry-After": str(exc.retry_after_s)})


async def _ledger_down(_request: Request, exc: Exception) -> JSONResponse:
    """The ledger refused or dropped the connection: the service is unavailable, the input was fine."""
    return JSONResponse(status_code=503, content={"detail": "the ledger is unavailable; try again"},
                        headers={"Retry-After": "5"})


def install(app: FastAPI) -> None:
    for error, status in STATUS.items():
        app.add_exception_handler(error, _handler(status))
    app.add_exception_handler(LoadShed, _shed)
    app.add_exception_handler(OperationalError, _ledger_down)
