"""The serving contract route by route (tiny model; SQLite and PostgreSQL; the machine's Redis)."""

from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from jobs import queue
from ledger.db import session_scope
from ledger.models import Interaction
from tests.conftest import ADMIN_TOKEN, record_run, service_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def queue_depth(api: TestClient) -> int:
    settings = api.app_settings  # type: ignore[attr-defined]
    redis = queue.connect(settings.redis_url)
    try:
        return queue.queue(redis, settings.redis_prefix).count
    finally:
        redis.close()


def untrained_interaction(service_home: Path) -> tuple[str, str]:
    """A (user, item) that some sample shows but no training sample contains, nor any validation sample (the
    versions chose their epoch on those)."""
    frame = pd.read_parquet(service_home / "runs" / "tiny" / "samples.parquet")
    trained = {k for keys in frame.loc[frame["split"] != "test", "interaction_keys"] for k in keys}
    seen = {k for keys in frame["interaction_keys"] for k in keys}
    user, item, _ = sorted(seen - trained)[0].split(":")
    return user, item


def test_health_and_readiness(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"ledger": "ok", "redis": "ok", "engine": "ok"}


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", "/users/u1/interactions"), ("GET", "/admin/status"), ("POST", "/admin/shards/0/retrain")])
def test_admin_routes_need_the_token(api: TestClient, method: str, path: str) -> None:
    assert api.request(method, path).status_code == 401
    assert api.request(method, path, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert api.request(method, path, headers={"Authorization": "Basic abc"}).status_code == 401


def test_recommend_scores_candidates_in_order(api: TestClient) -> None:
    answer = api.post("/recommend", json={"user_id": "u1", "candidates": ["6", 7, "8"], "top_k": 2})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["user_id"] == "u1" and body["fallback"] is False
    scores = [i["score"] for i in body["items"]]
    assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores)
    assert {i["item_id"] for i in body["items"]} <= {"6", "7", "8"}
    assert body["items"][0]["title"].endswith("(1995)")
    assert sum(a["weight"] for a in body["adapters"]) == pytest.approx(1.0)
    assert {a["version"] for a in body["adapters"]} == {1}


def test_recommend_without_candidates_ranks_popular_unrated_items(api: TestClient) -> None:
    body = api.post("/recommend", json={"user_id": "u1", "top_k": 100}).json()
    rated = {"1", "2", "3", "4", "5", "10"}  # u1's items (tests/conftest.py)
    assert {i["item_id"] for i in body["items"]} == {str(i) for i in range(1, 13)} - rated


@pytest.mark.parametrize(("body", "status"), [
    ({"user_id": "nobody", "candidates": ["1"]}, 404),
    ({"user_id": "u1", "candidates": ["1", "999", "x"]}, 422),
    ({"user_id": "u1", "candidates": []}, 422),
    ({"user_id": "u1", "candidates": [str(i) for i in range(101)]}, 422),
    ({"user_id": "u1", "top_k": 0}, 422),
    ({"user_id": "u1", "top_k": 101}, 422),
    ({"user_id": True}, 422),
    ({"user_id": "u1", "extra": 1}, 422),
    ({}, 422),
])
def test_recommend_rejects_bad_input_with_4xx(api: TestClient, body: dict, status: int) -> None:
    answer = api.post("/recommend", json=body)
    assert answer.status_code == status, answer.text
    assert "detail" in answer.json()


def test_unknown_candidates_are_listed(api: TestClient) -> None:
    detail = api.post("/recommend", json={"user_id": "u1", "candidates": ["1", "999", "x"]}).json()["detail"]
    assert detail["unknown_items"] == ["999", "x"]


def test_delete_some_items_then_idempotency(api: TestClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k-1"}
    first = api.delete("/users/u2/interactions", params=[("item_id", "6"), ("item_id", "7")], headers=headers)
    assert first.status_code == 202, first.text
    assert first.headers["Location"] == f"/deletions/{first.json()['request_id']}"
    depth = queue_depth(api)
    again = api.delete("/users/u2/interactions", params=[("item_id", "7"), ("item_id", "6")], headers=headers)
    assert again.status_code == 202
    assert again.json()["request_id"] == first.json()["request_id"]
    assert queue_depth(api) == depth, "a repeated request enqueues nothing"
    other_items = api.delete("/users/u2/interactions", params=[("item_id", "6")], headers=headers)
    assert other_items.status_code == 409 and "Idempotency-Key" in other_items.json()["detail"]
    settings = api.app_settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        live = {i.item_id for i in session.query(Interaction).filter_by(user_id="u2", deleted_at=None)}
    assert live == {"8", "9", "11", "12", "1", "2"}
    # what is already deleted cannot be deleted again: nothing live -> 404, no retrain
    assert api.delete("/users/u2/interactions", params=[("item_id", "6")], headers=AUTH).status_code == 404
    assert queue_depth(api) == depth
    # the deletion is visible, with its shards, and no certificate yet
    state = api.get(first.headers["Location"]).json()
    assert state["status"] in ("quarantined", "completed")
    assert (state["certificate"] is None) == (state["status"] != "completed")


def live_items(api: TestClient, user: str) -> set[str]:
    settings = api.app_settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        return {i.item_id for i in session.query(Interaction).filter_by(user_id=user, deleted_at=None)}


def test_an_idempotency_key_cannot_fake_another_users_deletion(api: TestClient) -> None:
    headers = {**AUTH, "Idempotency-Key": "k-shared"}
    first = api.delete("/users/u3/interactions", headers=headers)
    assert first.status_code == 202, first.text
    before = live_items(api, "u4")
    reused = api.delete("/users/u4/interactions", headers=headers)
    assert reused.status_code == 409, reused.text
    assert "another deletion request" in reused.json()["detail"]
    assert live_items(api, "u4") == before, "u4's data is untouched, and no 202 claimed otherwise"
    assert api.post("/recommend", json={"user_id": "u4", "candidates": ["4"]}).status_code == 200
    # a new key deletes u4 for real; the old key still answers for u3
    assert api.delete("/users/u4/interactions", headers={**AUTH, "Idempotency-Key": "k-u4"}).status_code == 202
    assert live_items(api, "u4") == set()
    assert api.delete("/users/u3/interactions", headers=headers).json()["request_id"] == first.json()["request_id"]


def test_concurrent_deletions_with_one_key_make_one_request(api: TestClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from ledger.models import DeletionRequest

    headers = {**AUTH, "Idempotency-Key": "k-race"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: api.delete("/users/u3/interactions", headers=headers), range(4)))
    assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
    assert len({a.json()["request_id"] for a in answers}) == 1
    settings = api.app_settings  # type: ignore[attr-defined]
    with session_scope(settings.ledger_url) as session:
        assert session.query(DeletionRequest).count() == 1
    assert live_items(api, "u3") == set()


def test_a_repeat_recommend_reuses_the_history_embedding_until_the_user_deletes(
        api: TestClient, service_home: Path) -> None:
    def embeds() -> float:
        lines = [line for line in api.get("/metrics").text.splitlines()
                 if line.startswith('apa_forward_batches_total{kind="embed"}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    user, item = untrained_interaction(service_home)  # deleting it quarantines nothing: answers stay mixed
    body = {"user_id": user, "candidates": ["3"]}
    first = api.post("/recommend", json=body).json()
    before = embeds()
    second = api.post("/recommend", json=body).json()
    assert embeds() == before, "the second request ran no history forward"
    assert second["items"] == first["items"] and second["adapters"] == first["adapters"]
    histories = api.app.state.gateway.replica.histories  # type: ignore[attr-defined]
    assert len(histories) == 1
    assert api.delete(f"/users/{user}/interactions", params={"item_id": item}, headers=AUTH).status_code == 202
    assert len(histories) == 0, "the deleting replica dropped the user's embedding"
    assert api.post("/recommend", json=body).json()["fallback"] is False
    assert embeds() == before + 1, "the history was embedded again"


def test_delete_unknown_user_and_unknown_request(api: TestClient) -> None:
    assert api.delete("/users/nobody/interactions", headers=AUTH).status_code == 404
    assert api.get("/deletions/does-not-exist").status_code == 404


def test_deleting_data_no_shard_trained_on_completes_at_once(api: TestClient, service_home: Path) -> None:
    user, item = untrained_interaction(service_home)
    answer = api.delete(f"/users/{user}/interactions", params={"item_id": item}, headers=AUTH)
    assert answer.json()["status"] == "completed" and answer.json()["affected_shards"] == []
    certificate = api.get(answer.headers["Location"]).json()["certificate"]
    assert certificate["shards"] == [] and certificate["violations"] == 0
    assert certificate["serving_manifests_checked"] == 2


def test_admin_status_and_retrain_errors(api: TestClient) -> None:
    status = api.get("/admin/status", headers=AUTH).json()
    assert [s["shard"] for s in status["shards"]] == [0, 1]
    assert all(s["state"] == "serving" and s["version"] == 1 and len(s["manifest_sha256"]) == 64
               for s in status["shards"])
    assert sum(s["n_samples"] for s in status["shards"]) == 8
    assert status["queue"] == {"depth": 0, "workers": 0}
    assert status["deletions"] == {}
    assert status["model"]["name"] and len(status["model"]["sha256"]) == 64
    attention = api.app.state.gateway.replica.attention.in_use  # type: ignore[attr-defined]
    shown = status["attention"]
    assert shown["configured"] == {"error": "auto", "knn": "auto", "tau": "auto"}  # the defaults
    assert shown["in_use"] == attention.setting.as_dict()
    assert shown["loo_valid_auc"] == round(attention.choice.valid_auc, 4)
    assert shown["validation_samples"] == len(attention.memory.sample_ids) > 0
    assert api.post("/admin/shards/7/retrain", headers=AUTH).status_code == 404
    assert api.post("/admin/shards/0/retrain", headers=AUTH).status_code == 409


def test_openapi_documents_the_contract(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    assert {"/recommend", "/users/{user_id}/interactions", "/deletions/{request_id}", "/admin/status",
            "/admin/shards/{shard}/retrain", "/healthz", "/readyz"} <= set(schema["paths"])
    assert schema["components"]["schemas"]["RecommendRequest"]["examples"]
    assert "bearer" in str(schema["components"]["securitySchemes"]).lower()
    delete = schema["paths"]["/users/{user_id}/interactions"]["delete"]
    assert {"202", "401", "403", "404"} <= set(delete["responses"])


def test_metrics_exposes_latency_by_route(api: TestClient) -> None:
    api.post("/recommend", json={"user_id": "u1", "candidates": ["1"]})
    text = api.get("/metrics").text
    assert 'apa_request_seconds_count{method="POST",route="/recommend",status="200"} 1.0' in text
    assert 'apa_predictions_total{fallback="false"} 1.0' in text


def test_a_sync_never_lifts_a_quarantine_whose_deletion_has_not_committed(api: TestClient) -> None:
    replica = api.app.state.gateway.replica  # type: ignore[attr-defined]
    with replica.quarantined_until_committed([0]):
        replica.sync()  # the ledger still says "serving" (nothing committed): shard 0 stays out
        assert 0 not in replica.active()
    replica.quarantine([1])
    replica.sync()
    assert set(replica.active()) == {0, 1}, "once nothing is pending, the ledger's word counts"


def test_the_attention_is_chosen_on_the_memory_and_again_when_it_shrinks(
    service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path,
) -> None:
    from apa.aggregation import Attention, AttentionGrid, choose_attention
    from service.app import create_app

    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, tau="auto", knn=3)
    record_run(settings)
    with TestClient(create_app(settings)) as client:
        replica = client.app.state.gateway.replica  # type: ignore[attr-defined]
        attention = replica.attention.in_use
        grid = AttentionGrid(knns=(3,))  # the error and tau are auto, the neighbours fixed
        assert attention.setting == choose_attention(attention.memory, mode="per-user", grid=grid).attention
        assert attention.setting.knn == 3
        replica.attention.drop(list(attention.memory.sample_ids[1:]))  # one sample left: nothing to choose with
        assert len(replica.attention.in_use.memory.sample_ids) == 1
        assert replica.attention.in_use.setting == Attention("mae", 3, 1000.0)  # the fixed knn, the paper's rest
        assert client.post("/recommend", json={"user_id": "u1", "candidates": ["1"]}).status_code == 200
        shown = client.get("/admin/status", headers=AUTH).json()["attention"]
        assert shown == {"mode": "nd", "configured": {"error": "auto", "knn": 3, "tau": "auto"},
                         "in_use": {"error": "mae", "knn": 3, "tau": 1000.0}, "loo_valid_auc": None,
                         "validation_samples": 1}


def test_attention_settings_are_values_or_auto() -> None:
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    assert ServiceSettings(tau="auto").tau == "auto"
    assert ServiceSettings(tau="30").tau == 30.0
    assert ServiceSettings(knn="all").knn == "all" and ServiceSettings(knn="7").knn == 7
    assert ServiceSettings(attention_error="brier").attention_grid().errors == ("brier",)
    assert ServiceSettings(knn="all").attention_grid().knns == (None,)
    for bad in ({"tau": -1.0}, {"tau": "often"}, {"knn": 0}, {"attention_error": "hinge"}):
        with pytest.raises(ValidationError):
            ServiceSettings(**bad)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_prefix_sharing_on_and_off_answer_the_same(
        service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> None:
    """Two gateways on the same run, APA_PREFIX_SHARING true and false: same items, same scores; concurrent
    users land in one micro-batch and are still each scored on their own prefix."""
    from concurrent.futures import ThreadPoolExecutor

    from service.app import create_app

    answers = {}
    for sharing in (True, False):
        settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir,
                                    prefix_sharing=sharing, batch_window_ms=200.0)
        if sharing:
            record_run(settings)
        with TestClient(create_app(settings)) as client, ThreadPoolExecutor(4) as pool:
            bodies = [{"user_id": u, "top_k": 100} for u in ("u1", "u2", "u3", "u4")]
            answers[sharing] = list(pool.map(lambda b: client.post("/recommend", json=b).json(), bodies))
            if sharing:  # u1 again: its prefix comes from the cache across requests
                assert client.post("/recommend", json=bodies[0]).json()["items"] == answers[True][0]["items"]
                metrics = client.get("/metrics").text
                assert 'apa_prefix_cache{stat="hits"} 1.0' in metrics
                assert 'apa_prefix_cache{stat="entries"} 4.0' in metrics
    for on, off in zip(answers[True], answers[False], strict=True):
        assert on["fallback"] is False and on["adapters"] == off["adapters"]
        assert [i["item_id"] for i in on["items"]] == [i["item_id"] for i in off["items"]]
        assert [i["score"] for i in on["items"]] == pytest.approx([i["score"] for i in off["items"]], abs=1e-4)
    assert len({tuple(i["score"] for i in a["items"]) for a in answers[True]}) == 4  # four users, four rankings
