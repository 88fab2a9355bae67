"""``PUT /items/{item_id}``: add (201) or retitle (200); trained prompts never change."""


from fastapi.testclient import TestClient

from ledger.db import session_scope
from ledger.models import Item, Sample
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_an_item_is_added_then_retitled_and_frozen_prompts_keep_the_old_title(api: TestClient) -> None:
    added = api.put("/items/13", json={"title": "Star Wars (1977)"}, headers=AUTH)
    assert added.status_code == 201 and added.json() == {"item_id": "13", "title": "Star Wars (1977)", "created": True}
    ingested = api.post("/users/u1/interactions", json={"interactions": [{"item_id": "13", "rating": 5}]},
                        headers=AUTH)
    assert ingested.status_code == 202, ingested.text
    renamed = api.put("/items/13", json={"title": "Star Wars: A New Hope (1977)"}, headers=AUTH)
    assert renamed.status_code == 200 and renamed.json()["created"] is False
    settings = api.app.state.gateway.settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        assert session.get(Item, "13").title == "Star Wars: A New Hope (1977)"  # type: ignore[union-attr]
        sample = session.query(Sample).filter(Sample.sample_id.like("u1:13:%")).one()
        assert '"Star Wars (1977)"' in (sample.prompt or ""), "the prompt built at ingestion stays"
    answer = api.post("/recommend", json={"user_id": "u2", "candidates": ["13"]}).json()
    assert answer["items"][0]["title"] == "Star Wars: A New Hope (1977)"


def test_put_item_needs_the_admin_token_and_a_title(api: TestClient) -> None:
    assert api.put("/items/13", json={"title": "X"}).status_code == 401
    assert api.put("/items/13", json={"title": "X"}, headers={"Authorization": "Bearer no"}).status_code == 403
    for body in ({}, {"title": ""}, {"title": "a\nb"}, {"title": "x" * 1025}, {"title": "x", "y": 1}):
        assert api.put("/items/13", json=body, headers=AUTH).status_code == 422
    assert api.put("/items/a:b", json={"title": "X"}, headers=AUTH).status_code == 422
