"""API shapes (DESIGN.md, "Serving contract"). They never expose ORM columns."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


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

ShardState = Literal["serving", "quarantined", "retraining", "failed"]
DeletionStatus = Literal["quarantined", "retraining", "completed", "failed"]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"user_id": "196", "candidates": ["242", "302", "377"], "top_k": 2}, {"user_id": "196"}]})

    user_id: Id
    candidates: list[Id] | None = Field(None, min_length=1, max_length=MAX_ITEMS,
                                        description="Items to score; none: the 20 most popular items "
                                                    "the user has not rated")
    top_k: int = Field(10, ge=1, le=100)


class ItemScore(BaseModel):
    item_id: str
    title: str
    score: float = Field(ge=0.0, le=1.0, description="p(yes): the model's probability the user likes it")


class AdapterWeight(BaseModel):
    shard: int
    version: int
    weight: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "user_id": "196", "items": [{"item_id": "302", "title": "L.A. Confidential (1997)", "score": 0.71}],
        "adapters": [{"shard": 0, "version": 1, "weight": 0.62}, {"shard": 1, "version": 2, "weight": 0.38}],
        "fallback": False}]})

    user_id: str
    items: list[ItemScore]
    adapters: list[AdapterWeight] = Field(description="Shards mixed into this answer (quarantined ones never are)")
    fallback: bool = Field(description="True when every shard is quarantined: ranked by item popularity")


class DeletionAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "5f0c6e0f2b7d4f0e9d7b0b0f6a1c2d3e", "status": "quarantined", "affected_shards": [1, 3]}]})

    request_id: str
    status: DeletionStatus
    affected_shards: list[int]


class ShardCertificate(BaseModel):
    shard: int
    old_version: int | None
    new_version: int | None
    old_manifest_sha256: str | None
    new_manifest_sha256: str | None


class Certificate(BaseModel):
    request_id: str
    interactions_removed: int
    samples_removed: int
    shards: list[ShardCertificate]
    deleted_hmacs: list[str] = Field(description="HMAC-SHA256 of each deleted interaction key (APA_HMAC_KEY)")
    serving_manifests_checked: int
    violations: int
    issued_at: datetime


class DeletionRequestPublic(BaseModel):
    request_id: str
    status: DeletionStatus
    affected_shards: list[int]
    created_at: datetime
    completed_at: datetime | None
    certificate: Certificate | None
    error: str | None = None
    overdue: bool = Field(False, description="It took (or has taken so far) longer than APA_FORGET_DEADLINE_S")


class ShardStatus(BaseModel):
    shard: int
    state: ShardState
    version: int | None
    n_samples: int | None
    trained_at: datetime | None
    manifest_sha256: str | None


class QueueStatus(BaseModel):
    depth: int | None = Field(description="Jobs waiting; null when Redis cannot be reached")
    workers: int | None


class ModelInfo(BaseModel):
    name: str
    sha256: str


class AttentionSetting(BaseModel):
    error: str = Field(description="mae | brier | logloss (or auto, as configured)")
    knn: int | Literal["all", "auto"]
    tau: float | Literal["auto"]


class AttentionStatus(BaseModel):
    mode: Literal["nd", "d"]
    configured: AttentionSetting = Field(description="APA_ATTENTION_ERROR, APA_KNN and APA_TAU")
    in_use: AttentionSetting | None = Field(description="The attention in use, chosen on the validation memory "
                                                        "(leave one out) where configured auto; null before the "
                                                        "first sync")
    loo_valid_auc: float | None = Field(description="Leave-one-out validation AUC of the attention in use; null "
                                                    "when too few samples were left to choose with")
    validation_samples: int = Field(description="Live validation samples the per-user weights attend over")


class ForgetStatus(BaseModel):
    deadline_s: float = Field(description="APA_FORGET_DEADLINE_S: a deletion completes within it")
    oldest_open_s: float | None = Field(description="How long the oldest open deletion has waited (this replica's "
                                                    "last ledger sync); null when none is open")
    overdue: int = Field(description="Open deletions past the deadline (alert on > 0)")
    stance: Literal["normal", "yield", "shed"] = Field(
        description="normal; yield: the model thread sleeps between batches; shed: /recommend answers 503")


class AdminStatus(BaseModel):
    shards: list[ShardStatus]
    queue: QueueStatus
    deletions: dict[str, int]
    model: ModelInfo
    attention: AttentionStatus
    forget: ForgetStatus | None = None


class RetrainAccepted(BaseModel):
    shard: int
    enqueued: bool = Field(description="False when a retrain of this shard is already waiting")


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


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}
