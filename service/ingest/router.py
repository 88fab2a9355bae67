"""``POST /users/{user_id}/interactions``: parse, call the ingestion service (``service.py``), answer."""

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path

from service.deps import GatewayDep, IngestDep, ReplicaDep, SessionDep
from service.ingest.schemas import IngestAccepted, IngestRequest
from service.ingest.service import IngestionService, interactions_of
from service.schemas import IdParam, error_responses

router = APIRouter(tags=["ingestion"])


def get_ingestion_service(gateway: GatewayDep, replica: ReplicaDep) -> IngestionService:
    return IngestionService(settings=gateway.settings, replica=replica, redis=gateway.redis, metrics=gateway.metrics)


IngestionServiceDep = Annotated[IngestionService, Depends(get_ingestion_service)]


@router.post("/users/{user_id}/interactions", status_code=202, response_model=IngestAccepted,
             responses=error_responses(
                 400, 401, 403, 409, 413, 422, 429, 503,
                 _409="The Idempotency-Key was used for another batch (another user or other interactions)",
                 _422="Unknown items (listed), a rating outside 1-5, a timestamp before 1995 or over a day "
                      "ahead, an id off the pattern (or user and item ids too long together for an interaction "
                      "key of 200 characters), or an empty or oversized batch"))
def add_interactions(
    user_id: Annotated[IdParam, Path(examples=["196"])], body: IngestRequest, session: SessionDep,
    token_hmac: IngestDep, service: IngestionServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> IngestAccepted:
    """Record what a user rated (1 to 1,000 interactions, all or nothing). The user's next ``/recommend``
    uses the new history and no longer offers these items; each new interaction with enough earlier
    history (the run's ``min_history``, ten for a default run) becomes a TALLRec sample, which joins the
    validation memory (a seeded ``APA_INGEST_VALID_FRACTION``) or one shard, trained at that shard's next
    retrain (``APA_INGEST_MIN_SAMPLES`` pending or ``APA_INGEST_MAX_DELAY_S``, or an admin's
    ``POST /admin/shards/{k}/retrain``). A user unknown until now is created. A repeated (user, item,
    timestamp) is a duplicate, never a second row. Same ``Idempotency-Key`` (per token, 24 h): the first
    answer."""
    return service.accept(session=session, user_id=user_id, interactions=interactions_of(body),
                          token_hmac=token_hmac, idempotency_key=idempotency_key)
