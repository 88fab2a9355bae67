"""``POST /recommend``: parse the body, ask the recommender (``service.py``), answer."""

from fastapi import APIRouter

from service.deps import ClientDep, RecommenderDep
from service.recommend.schemas import RecommendRequest, RecommendResponse
from service.schemas import error_responses

router = APIRouter(tags=["recommend"])


@router.post("/recommend", response_model=RecommendResponse, dependencies=[ClientDep],
             responses=error_responses(400, 401, 403, 404, 413, 422, 503, _404="Unknown user, or no live interactions",
                                       _422="Unknown candidate items (listed) or a malformed request"))
async def recommend(body: RecommendRequest, recommender: RecommenderDep) -> RecommendResponse:
    """Score candidates (or the 20 most popular unrated items) for a user; highest p(yes) first."""
    return await recommender.recommend(body)
