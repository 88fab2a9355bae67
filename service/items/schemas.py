"""``PUT /items/{item_id}``: a title in, the item out."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Title = Annotated[str, StringConstraints(min_length=1, max_length=1024, strip_whitespace=True,
                                         pattern=r"^[^\x00-\x1f\x7f]+$")]


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"title": "Star Wars (1977)"}]})

    title: Title


class ItemPublic(BaseModel):
    item_id: str
    title: str
    created: bool = Field(description="True when the item is new (201); False when it existed (200)")
