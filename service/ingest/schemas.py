"""``POST /users/{user_id}/interactions``: the batch and the answer."""

import time
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.schemas import Id

MAX_INTERACTIONS = 1000
EARLIEST = 788918400  # 1995-01-01T00:00:00Z: nothing older is a real rating of this service
AHEAD_S = 86400  # a timestamp may run at most a day ahead of the server's clock

Rating = Annotated[float, Field(ge=1, le=5, strict=True, description="1 to 5 (a number, not a string)")]
Timestamp = Annotated[int, Field(ge=EARLIEST, strict=True, description="Unix seconds (UTC), from 1995 to a day "
                                                                       "ahead; absent: the server's time")]


class InteractionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: Id
    rating: Rating
    timestamp: Timestamp | None = None

    @model_validator(mode="after")
    def _not_ahead(self) -> "InteractionIn":
        if self.timestamp is not None and self.timestamp > time.time() + AHEAD_S:
            raise ValueError(f"timestamp {self.timestamp} is more than a day ahead of the server's clock")
        return self


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"interactions": [{"item_id": "1", "rating": 4, "timestamp": 893286638}, {"item_id": "2", "rating": 2}]}]})

    interactions: list[InteractionIn] = Field(min_length=1, max_length=MAX_INTERACTIONS)


class SampleCounts(BaseModel):
    train: int
    valid: int


class IngestAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "accepted": 2, "duplicates": 0, "samples": {"train": 2, "valid": 0}, "pending_shards": [1, 3]}]})

    accepted: int = Field(description="New interactions recorded")
    duplicates: int = Field(description="Interactions the ledger holds already (same user, item and timestamp), "
                                        "or repeated in the batch: never a second row")
    samples: SampleCounts = Field(description="New TALLRec samples (ten earlier items each), by split")
    pending_shards: list[int] = Field(description="Shards the new training samples joined; they train at those "
                                                  "shards' next retrain. A semantic run places its samples once "
                                                  "the worker has embedded them: then this is empty and "
                                                  "/admin/status shows them")
