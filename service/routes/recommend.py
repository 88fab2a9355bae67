from fastapi import APIRouter

from service.deps import RecommenderDep
from service.schemas import RecommendRequest, RecommendResponse

router = APIRouter(tags=["recommend"])


@router.post("/recommend", response_model=RecommendResponse,
             responses={404: {"description": "Unknown user, or no live interactions"},
                        422: {"description": "Unknown candidate items (listed) or a malformed request"}})
async def recommend(body: RecommendRequest, recommender: RecommenderDep) -> RecommendResponse:
    """Score candidates (or the 20 most popular unrated items) for a user; highest p(yes) first."""
    return await recommender.recommend(body)
