"""``POST /recommend``'s request and answer."""

from pydantic import BaseModel, ConfigDict, Field

from service.schemas import MAX_ITEMS, Id


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
