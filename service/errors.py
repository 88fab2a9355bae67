"""Domain errors (``apa.errors``) to HTTP answers: each maps to one status code and a clear message."""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from apa.errors import (
    APAError,
    DeletionNotFound,
    IdempotencyConflict,
    ItemsNotFound,
    LedgerError,
    NothingToRetrain,
    ShardNotFound,
    UserNotFound,
)

STATUS: dict[type[APAError], int] = {
    UserNotFound: 404,
    DeletionNotFound: 404,
    ShardNotFound: 404,
    ItemsNotFound: 422,
    NothingToRetrain: 409,
    IdempotencyConflict: 409,
    LedgerError: 503,
}


def _handler(status: int):  # type: ignore[no-untyped-def]
    async def handle(_request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, ItemsNotFound):
            return JSONResponse(status_code=status, content={
                "detail": {"message": "unknown item(s)", "unknown_items": exc.item_ids}})
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    return handle


def install(app: FastAPI) -> None:
    for error, status in STATUS.items():
        app.add_exception_handler(error, _handler(status))
