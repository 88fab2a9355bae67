"""Bad input is a 4xx and an unreachable ledger a 503, never a 5xx or plain text (issue 13)."""

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from apa.ledger import db
from tests.conftest import ADMIN_TOKEN, record_run, service_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PG_ONLY = pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)


@pytest.fixture
def make_api(service_home: Path, ledger_url: str, redis_prefix: str,
             tiny_model_dir: Path) -> Iterator[Callable[..., TestClient]]:
    from service.app import create_app

    clients: list[TestClient] = []

    def make(**extra: Any) -> TestClient:
        settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, **extra)
        if not clients:
            record_run(settings)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., TestClient]) -> TestClient:
    return make_api()


def assert_json_error(answer: Any, status: int) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert "detail" in answer.json()


@pytest.mark.parametrize("shard", [2**63, 2**31, -1])
def test_a_shard_number_out_of_range_is_422(api: TestClient, shard: int) -> None:
    assert_json_error(api.post(f"/admin/shards/{shard}/retrain", headers=AUTH), 422)


def test_the_largest_shard_number_is_just_unknown(api: TestClient) -> None:
    assert_json_error(api.post(f"/admin/shards/{2**31 - 1}/retrain", headers=AUTH), 404)


@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("POST", "/recommend", {"json": {"user_id": "u\x001"}}),
    ("POST", "/recommend", {"json": {"user_id": "u1", "candidates": ["1\x00"]}}),
    ("POST", "/recommend", {"content": b'{"user_id": "\\ud800"}', "headers": {"content-type": "application/json"}}),
    ("POST", "/recommend", {"content": b'{"user_id": "u1", "candidates": ["\\udfff"]}',
                            "headers": {"content-type": "application/json"}}),
    ("DELETE", "/users/u%001/interactions", {"headers": AUTH}),
    ("DELETE", "/users/u1/interactions", {"headers": AUTH, "params": {"item_id": "1\x00"}}),
    ("DELETE", "/users/u1/interactions", {"headers": AUTH, "params": [("item_id", str(i)) for i in range(101)]}),
    ("GET", "/deletions/abc%00def", {}),
])
def test_nul_and_lone_surrogates_in_ids_are_422(api: TestClient, method: str, path: str, kwargs: dict) -> None:
    answer = api.request(method, path, **kwargs)
    assert_json_error(answer, 422)


def test_an_undecodable_path_id_is_just_unknown(api: TestClient) -> None:
    assert_json_error(api.delete("/users/%ED%A0%80/interactions", headers=AUTH), 404)
    assert_json_error(api.get("/deletions/%ED%A0%80"), 404)


def test_openapi_shows_the_id_pattern_and_bounds(api: TestClient) -> None:
    from service.schemas import ID_PATTERN

    schema = api.get("/openapi.json").json()
    delete = schema["paths"]["/users/{user_id}/interactions"]["delete"]
    params = {p["name"]: p["schema"] for p in delete["parameters"]}
    assert params["user_id"]["pattern"] == ID_PATTERN
    item = params["item_id"]["anyOf"][0]
    assert item["items"]["pattern"] == ID_PATTERN and item["maxItems"] == 100
    get = schema["paths"]["/deletions/{request_id}"]["get"]
    assert get["parameters"][0]["schema"]["pattern"] == ID_PATTERN
    retrain = schema["paths"]["/admin/shards/{shard}/retrain"]["post"]
    assert retrain["parameters"][0]["schema"] | {"title": None} == {
        "type": "integer", "minimum": 0, "maximum": 2**31 - 1, "title": None}
    request = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert request["user_id"]["pattern"] == ID_PATTERN


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@PG_ONLY
def test_a_refused_ledger_is_a_json_503_with_retry_after(api: TestClient) -> None:
    gateway = api.app.state.gateway  # type: ignore[attr-defined]
    refused = f"postgresql+psycopg://postgres@127.0.0.1:{unused_port()}/test"
    sessions = db.session_factory(refused, connect_timeout_s=2, statement_timeout_s=1)
    gateway.sessions = gateway.recommender.sessions = sessions
    try:
        answers = {
            "recommend": api.post("/recommend", json={"user_id": "u1", "candidates": ["6"]}),
            "delete": api.delete("/users/u1/interactions", headers=AUTH),
            "deletion": api.get("/deletions/abc"),
            "status": api.get("/admin/status", headers=AUTH),
            "metrics": api.get("/metrics"),
        }
        for name, answer in answers.items():
            assert answer.status_code == 503, (name, answer.text)
            assert answer.json() == {"detail": "the ledger is unavailable; try again later"}, name
            assert int(answer.headers["Retry-After"]) > 0, name
        assert api.get("/healthz").status_code == 200
        assert api.get("/readyz").status_code == 503
    finally:
        db.get_engine(refused, connect_timeout_s=2, statement_timeout_s=1).dispose()


def test_an_unexpected_error_is_a_json_500(api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from apa.ledger import repository

    def broken(**_: Any) -> None:
        raise RuntimeError("u1 secret detail")

    monkeypatch.setattr(repository, "get_deletion", broken)
    answer = api.get("/deletions/abc")
    assert_json_error(answer, 500)
    assert answer.json() == {"detail": "internal error"}


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel's backlog) and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield int(server.getsockname()[1])
    server.close()


def test_a_silent_ledger_fails_within_the_connect_timeout(silent_server: int) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:{silent_server}/test"
    engine = db.get_engine(url, connect_timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(OperationalError), engine.connect():
            pass
        assert time.monotonic() - started < 10
    finally:
        engine.dispose()


@PG_ONLY
def test_a_long_statement_is_cancelled_by_the_statement_timeout(ledger_url: str) -> None:
    engine = db.get_engine(ledger_url, statement_timeout_s=0.3)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW statement_timeout")).scalar() == "300ms"
            assert connection.execute(text("SELECT current_schemas(false)[1]")).scalar().startswith("t_"), \
                "the URL's own options (search_path) are kept"
        started = time.monotonic()
        with pytest.raises(OperationalError, match="statement timeout"), engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 3
    finally:
        engine.dispose()


def test_sqlite_waits_for_its_lock_as_long_as_configured(tmp_path: Path) -> None:
    engine = db.get_engine(f"sqlite:///{tmp_path / 'l.db'}", statement_timeout_s=1.5)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1500
    engine.dispose()


def test_the_service_settings_bound_the_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import ServiceSettings

    monkeypatch.setenv("APA_LEDGER_CONNECT_TIMEOUT_S", "3")
    monkeypatch.setenv("APA_LEDGER_STATEMENT_TIMEOUT_S", "2.5")
    assert ServiceSettings().ledger_timeouts() == {"connect_timeout_s": 3, "statement_timeout_s": 2.5}


