"""``PUT /items/{item_id}`` (admin): add or retitle a catalog item."""

from typing import Annotated

from fastapi import APIRouter, Path, Response

from ledger import ingest
from service.deps import AdminDep, SessionDep
from service.items.schemas import ItemIn, ItemPublic
from service.schemas import IdParam, error_responses

router = APIRouter(tags=["catalog"])


@router.put("/items/{item_id}", response_model=ItemPublic, responses={
    201: {"model": ItemPublic, "description": "Added"}, **error_responses(400, 401, 403, 413, 422, 429, 503)})
def put_item(item_id: Annotated[IdParam, Path(examples=["1"])], body: ItemIn, response: Response, _: AdminDep,
             session: SessionDep) -> ItemPublic:
    """Add an item (201) or retitle one (200). Samples already built keep the titles they were built with
    (their prompts are frozen in the run folder and the ledger); ``/recommend`` and new samples use the
    new title."""
    created = ingest.put_item(session=session, item_id=item_id, title=body.title)
    session.commit()
    response.status_code = 201 if created else 200
    return ItemPublic(item_id=item_id, title=body.title, created=created)
