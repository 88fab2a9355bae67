"""What every feature's API shapes share: ids and the error body (DESIGN.md, "Serving contract").

Each feature keeps its own shapes beside its router (``service/<feature>/schemas.py``); none exposes
ORM columns."""

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, StringConstraints


def _id(value: Any) -> Any:
    """Ids are strings; integers are accepted and converted (booleans and floats are not ids)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


# No whitespace, ':' (it separates an interaction key's parts), '/' (ids are path segments) or control
# characters (PostgreSQL refuses NUL); pydantic refuses lone surrogates before the pattern is tried.
ID_PATTERN = r"^[^\s:/\x00-\x1f\x7f]+$"
ID_MAX_LENGTH = 200  # the ledger's id columns
IdParam = Annotated[str, StringConstraints(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]
Id = Annotated[IdParam, BeforeValidator(_id)]  # after the constraints, or the schema loses them
SHARD_MAX = 2**31 - 1  # the ledger's integer columns
MAX_ITEMS = 100  # candidates per /recommend, items per DELETE


class ErrorResponse(BaseModel):
    """Every error: a message, or (422) the validation errors, or (unknown items) the ids."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": "wrong token"}]})

    detail: str | dict[str, Any] | list[dict[str, Any]]


ERROR_DESCRIPTIONS = {
    400: "The body is not JSON", 401: "No bearer token", 403: "Wrong token", 404: "Not found", 409: "Conflict",
    413: "Request body too large", 422: "Malformed request", 429: "Too many requests with this token "
    "(Retry-After)", 503: "Unavailable: ledger unreachable, engine not loaded or model queue full (Retry-After)",
}


def error_responses(*codes: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each code with the typed error body (``descriptions``: ``_404=...``)."""
    return {code: {"model": ErrorResponse, "description": descriptions.get(f"_{code}", ERROR_DESCRIPTIONS[code])}
            for code in codes}
