"""``POST /users/{user_id}/interactions`` on the tiny run (SQLite and PostgreSQL): the answer, duplicates,
idempotency, all-or-nothing, bad input refused with nothing written, tokens, the shared rate limit, and
the next ``/recommend`` using the new history at once."""

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ledger.db import session_scope
from ledger.models import IngestionRequest, Interaction, Sample
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INGEST_TOKEN = "test-ingest-token"
INGEST = {"Authorization": f"Bearer {INGEST_TOKEN}"}
NOW = int(time.time())


@pytest.fixture
def api_options() -> dict[str, Any]:
    return {"ingest_token": INGEST_TOKEN}


def use_partition(api: TestClient, name: str) -> None:
    """The gateway places new samples as if its run had been partitioned by ``name``."""
    replica = api.app.state.gateway.replica  # type: ignore[attr-defined]
    replica.run = replace(replica.run, config=replace(replica.run.config, partition=name))


def post(api: TestClient, user: str, interactions: list[dict[str, Any]], headers: dict[str, str] | None = None,
         ) -> Any:
    return api.post(f"/users/{user}/interactions", json={"interactions": interactions},
                    headers=INGEST if headers is None else headers)


def rows(api: TestClient) -> tuple[int, int, int]:
    """(interactions, samples, ingestion requests) in the ledger."""
    settings = api.app.state.gateway.settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        return (session.scalar(select(func.count()).select_from(Interaction)) or 0,
                session.scalar(select(func.count()).select_from(Sample)) or 0,
                session.scalar(select(func.count()).select_from(IngestionRequest)) or 0)


def test_an_ingestion_is_recorded_with_its_samples_and_a_repeat_is_a_duplicate(api: TestClient) -> None:
    before = rows(api)
    answer = post(api, "u1", [{"item_id": "6", "rating": 5, "timestamp": NOW - 100},
                              {"item_id": 7, "rating": 2, "timestamp": NOW - 50}])
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 2 and body["duplicates"] == 0
    assert body["samples"]["train"] + body["samples"]["valid"] == 2, "u1 has history: each new rating is a sample"
    assert body["pending_shards"] == [], "a semantic run's worker places its samples"
    assert rows(api)[:2] == (before[0] + 2, before[1] + 2)

    again = post(api, "u1", [{"item_id": "6", "rating": 5, "timestamp": NOW - 100},
                             {"item_id": "6", "rating": 5, "timestamp": NOW - 100}])
    assert again.status_code == 202
    assert again.json() == {"accepted": 0, "duplicates": 2, "samples": {"train": 0, "valid": 0},
                            "pending_shards": []}
    assert rows(api)[:2] == (before[0] + 2, before[1] + 2), "never a second row"

    settings = api.app.state.gateway.settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        sample = session.get(Sample, f"u1:7:{NOW - 50}")
        assert sample is not None and sample.ingested_at is not None and sample.trained_version is None
        assert sample.content is not None and sample.content["interaction_keys"][-2:] == [
            f"u1:6:{NOW - 100}", f"u1:7:{NOW - 50}"], "the earlier new rating is in its history"
        assert sample.label == 0 and "Babe (1995)" in (sample.prompt or "")
        assert len(sample.content["history_item_ids"]) == 7, "u1's six ratings and the one before it"


def test_an_idempotency_key_returns_the_first_answer_and_refuses_another_batch(api: TestClient) -> None:
    batch = [{"item_id": "8", "rating": 4, "timestamp": NOW - 10}]
    first = api.post("/users/u2/interactions", json={"interactions": batch},
                     headers={**INGEST, "Idempotency-Key": "k1"})
    again = api.post("/users/u2/interactions", json={"interactions": batch},
                     headers={**INGEST, "Idempotency-Key": "k1"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and first.json()["accepted"] == 1
    other = api.post("/users/u2/interactions", json={"interactions": [{**batch[0], "rating": 1}]},
                     headers={**INGEST, "Idempotency-Key": "k1"})
    assert other.status_code == 409
    by_admin = api.post("/users/u2/interactions", json={"interactions": batch},
                        headers={**AUTH, "Idempotency-Key": "k1"})
    assert by_admin.status_code == 202 and by_admin.json()["duplicates"] == 1, "keys are per token"
    untimed = [{"item_id": "9", "rating": 3}, {"item_id": "9", "rating": 3, "timestamp": NOW - 20}]
    replies = [api.post("/users/u2/interactions", json={"interactions": untimed},
                        headers={**INGEST, "Idempotency-Key": "k2"}) for _ in range(2)]
    assert [r.status_code for r in replies] == [202, 202] and replies[0].json() == replies[1].json(), \
        "a batch without timestamps binds its key as sent (the server's time is not part of it)"


def test_a_batch_is_all_or_nothing(api: TestClient) -> None:
    before = rows(api)
    answer = post(api, "u3", [{"item_id": "1", "rating": 4, "timestamp": NOW},
                              {"item_id": "nope", "rating": 4}, {"item_id": "zz", "rating": 1}])
    assert answer.status_code == 422
    assert answer.json()["detail"]["unknown_items"] == ["nope", "zz"]
    assert rows(api) == before, "nothing half-written"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("interactions", [
    [{"item_id": "1", "rating": 0}], [{"item_id": "1", "rating": 6}], [{"item_id": "1", "rating": "4"}],
    [{"item_id": "1", "rating": True}], [{"item_id": "1", "rating": None}], [{"item_id": "1"}],
    [{"item_id": "1", "rating": 4, "timestamp": 788918399}],
    [{"item_id": "1", "rating": 4, "timestamp": NOW + 2 * 86400}],
    [{"item_id": "1", "rating": 4, "timestamp": "893286638"}],
    [{"item_id": "a:b", "rating": 4}], [{"item_id": "", "rating": 4}], [{"item_id": "1", "rating": 4, "x": 1}],
    [], [{"item_id": "1", "rating": 4}] * 1001,
])
def test_bad_input_is_422_and_writes_nothing(api: TestClient, interactions: list[dict[str, Any]]) -> None:
    before = rows(api)
    answer = post(api, "u1", interactions)
    assert answer.status_code == 422, answer.text
    assert "detail" in answer.json()
    assert rows(api) == before


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_ids_off_the_pattern_tokens_and_body_limits(make_api: Callable[..., TestClient]) -> None:
    api = make_api(max_body_bytes=4096)
    assert post(api, "a:b", [{"item_id": "1", "rating": 4}]).status_code == 422
    assert post(api, "u1", [{"item_id": "1", "rating": 4}], headers={}).status_code == 401
    assert post(api, "u1", [{"item_id": "1", "rating": 4}], headers={"Authorization": "Bearer no"}).status_code == 403
    assert post(api, "u1", [{"item_id": "1", "rating": 4}], headers={"Authorization": "Basic x"}).status_code == 401
    big = [{"item_id": "1", "rating": 4, "timestamp": NOW - i} for i in range(200)]
    assert post(api, "u1", big).status_code == 413
    assert api.put("/items/99", json={"title": "X"}, headers=INGEST).status_code == 403, "the ingest token is not admin"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_rate_limit_is_one_per_token_across_replicas(make_api: Callable[..., TestClient]) -> None:
    first, second = make_api(ingest_rate_per_s=0.1, ingest_burst=3), make_api(ingest_rate_per_s=0.1, ingest_burst=3)
    codes = [post(api, "u4", [{"item_id": "6", "rating": 3, "timestamp": NOW - i}]).status_code
             for i, api in enumerate([first, second, first])]
    assert codes == [202, 202, 202]
    limited = post(second, "u4", [{"item_id": "6", "rating": 3, "timestamp": NOW - 9}])
    assert limited.status_code == 429, "the second replica counts the first one's requests"
    assert 1 <= int(limited.headers["Retry-After"]) <= 30
    assert post(second, "u4", [{"item_id": "6", "rating": 3}], headers=AUTH).status_code == 202, \
        "another token has its own limit"


def test_the_next_recommend_uses_the_new_history_and_a_new_user_gets_an_answer(api: TestClient) -> None:
    first = api.post("/recommend", json={"user_id": "u1"}).json()
    offered = [i["item_id"] for i in first["items"]]
    assert "6" in offered
    histories = api.app.state.gateway.replica.histories  # type: ignore[attr-defined]
    assert "u1" in histories
    assert post(api, "u1", [{"item_id": "6", "rating": 5}]).status_code == 202
    assert "u1" not in histories, "the cached history of the user is dropped at once"
    after = api.post("/recommend", json={"user_id": "u1"}).json()
    assert "6" not in [i["item_id"] for i in after["items"]], "a rated item is no longer a candidate"
    assert "u1" in histories

    assert api.post("/recommend", json={"user_id": "newcomer"}).status_code == 404
    answer = post(api, "newcomer", [{"item_id": "2", "rating": 5, "timestamp": NOW - 5}])
    assert answer.json()["samples"] == {"train": 0, "valid": 0}, "one rating has no earlier history"
    fresh = api.post("/recommend", json={"user_id": "newcomer", "candidates": ["1", "3"]})
    assert fresh.status_code == 200, fresh.text
    assert [i["item_id"] for i in fresh.json()["items"]] != [] and fresh.json()["fallback"] is False


def test_admin_status_shows_pending_samples_per_shard(make_api: Callable[..., TestClient]) -> None:
    api = make_api(ingest_valid_fraction=0.0)
    use_partition(api, "random")  # places its samples at once
    answer = post(api, "u2", [{"item_id": "3", "rating": 4, "timestamp": NOW - 1}]).json()
    assert answer["samples"] == {"train": 1, "valid": 0} and len(answer["pending_shards"]) == 1
    status = api.get("/admin/status", headers=AUTH).json()
    pending = {s["shard"]: s["pending_samples"] for s in status["shards"]}
    assert pending[answer["pending_shards"][0]] == 1 and sum(pending.values()) == 1
    due = [s["next_retrain_due"] for s in status["shards"] if s["pending_samples"]]
    assert due[0] is not None, "an hour after it arrived (APA_INGEST_MAX_DELAY_S)"
    assert status["ingest"] == {"min_samples": 32, "max_delay_s": 3600.0, "unplaced_samples": 0}


def test_random_and_user_partitions_place_new_samples_at_once(make_api: Callable[..., TestClient]) -> None:
    import numpy as np

    from apa.partition import Incoming, assign_random

    api = make_api(ingest_valid_fraction=0.0)
    use_partition(api, "user")
    # u2's training samples: two in shard 0, one in shard 1 (tests/ledger/conftest.py)
    assert post(api, "u2", [{"item_id": "3", "rating": 4, "timestamp": NOW}]).json()["pending_shards"] == [0]
    # a new user: the least loaded shard (0 now holds 5, 1 holds 4); both of their samples go there
    newcomer = post(api, "n1", [{"item_id": i, "rating": 4, "timestamp": NOW - 10 + n}
                                for n, i in enumerate(["1", "2", "3"])]).json()
    assert newcomer["samples"]["train"] == 2 and newcomer["pending_shards"] == [1]

    use_partition(api, "random")
    answer = post(api, "u3", [{"item_id": "1", "rating": 2, "timestamp": NOW}]).json()
    expected = assign_random(Incoming(sample_ids=[f"u3:1:{NOW}"], user_ids=["u3"], sizes=np.zeros(2), seed=0))
    assert answer["pending_shards"] == [int(expected[0])]


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_ids_too_long_together_for_an_interaction_key_are_422(api: TestClient) -> None:
    before = rows(api)
    answer = post(api, "0" * 200, [{"item_id": "1", "rating": 4, "timestamp": NOW}])
    assert answer.status_code == 422 and "200 characters" in answer.json()["detail"]
    assert rows(api) == before
