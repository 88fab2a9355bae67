"""Bad input is a 4xx and an unreachable ledger a 503, never a 5xx or plain text (issue 13)."""

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from ledger import db
from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PG_ONLY = pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)


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
        "type": "integer", "minimum": 0, "maximum": 2**31 - 1, "title": None, "examples": [0]}
    request = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert request["user_id"]["pattern"] == ID_PATTERN


def test_every_error_response_is_declared_with_a_typed_body(api: TestClient) -> None:
    schema = api.get("/openapi.json").json()
    expected = {("/recommend", "post"): {"400", "404", "413", "422", "503"},
                ("/users/{user_id}/interactions", "delete"): {"401", "403", "404", "409", "413", "422", "429", "503"},
                ("/deletions/{request_id}", "get"): {"404", "413", "422", "503"},
                ("/admin/status", "get"): {"401", "403", "413", "429", "503"},
                ("/admin/shards/{shard}/retrain", "post"): {"401", "403", "404", "409", "413", "422", "429", "503"}}
    for (path, method), codes in expected.items():
        responses = schema["paths"][path][method]["responses"]
        assert codes <= set(responses), (path, codes - set(responses))
        for code in codes:
            body = responses[code]["content"]["application/json"]["schema"]
            assert body == {"$ref": "#/components/schemas/ErrorResponse"}, (path, code)


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
    from ledger import deletions

    def broken(**_: Any) -> None:
        raise RuntimeError("u1 secret detail")

    monkeypatch.setattr(deletions, "get_deletion", broken)
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
            assert connection.execute(text("SHOW search_path")).scalar().startswith("t_"), \
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




# -- bounded work ---------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_parsing(make_api: Callable[..., TestClient]) -> None:
    api = make_api(max_body_bytes=1024)
    big = b'{"user_id": "u1", "candidates": [' + b'"1",' * 400 + b'"1"]}'
    answer = api.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert_json_error(answer, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"user_id": "u1", "candidates": ['
        for _ in range(40):
            yield b'"1",' * 10
        yield b'"1"]}'

    assert_json_error(api.post("/recommend", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert_json_error(api.request("DELETE", "/users/u1/interactions", content=b"x" * 2000, headers=AUTH), 413)
    assert api.post("/recommend", json={"user_id": "u1", "candidates": ["6"]}).status_code == 200


def test_the_rate_limit_is_a_window_per_key_shared_through_redis(redis_prefix: str) -> None:
    from service.limits import RateLimiter
    from tests.conftest import REDIS_URL

    first, second = RateLimiter(REDIS_URL, f"{redis_prefix}rate"), RateLimiter(REDIS_URL, f"{redis_prefix}rate")
    assert [first.take("admin", "a", rate=1.0, burst=2), second.take("admin", "a", rate=1.0, burst=2)] == [0.0, 0.0]
    wait = first.take("admin", "a", rate=1.0, burst=2)
    assert 0 < wait <= 2.0, "2 requests per 2 s, counted across both limiters"
    assert second.take("admin", "b", rate=1.0, burst=2) == 0.0, "each key has its own window"
    assert second.take("ingest", "a", rate=1.0, burst=2) == 0.0, "each limit too"
    unreachable = RateLimiter("redis://127.0.0.1:1/0", "x")
    assert [unreachable.take("admin", "a", rate=1.0, burst=1) == 0.0 for _ in range(2)] == [True, False], \
        "without Redis the replica still limits, alone"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_admin_routes_are_rate_limited_per_token(make_api: Callable[..., TestClient]) -> None:
    api = make_api(admin_rate_per_s=0.1, admin_burst=2)
    assert [api.get("/admin/status", headers=AUTH).status_code for _ in range(2)] == [200, 200]
    limited = api.delete("/users/u1/interactions", headers=AUTH)
    assert_json_error(limited, 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 20  # 2 requests per 20 s
    assert api.post("/admin/shards/0/retrain", headers=AUTH).status_code == 429
    assert api.get("/admin/status", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert api.post("/recommend", json={"user_id": "u1", "candidates": ["6"]}).status_code == 200, \
        "the limit is on DELETE and /admin/* only"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_a_full_model_queue_answers_503_and_health_never_waits(
        make_api: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api = make_api(max_model_waiting=1, probe_timeout_s=0.5)
    gateway = api.app.state.gateway  # type: ignore[attr-defined]
    engine = gateway.replica.engine
    release, entered = threading.Event(), threading.Event()

    def held(real: Callable[..., Any]) -> Callable[..., Any]:
        def score(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(30)
            return real(*args, **kwargs)
        return score

    for name in ("score", "score_shared"):  # whichever path APA_PREFIX_SHARING picks
        monkeypatch.setattr(engine, name, held(getattr(engine, name)))
    body = {"user_id": "u1", "candidates": ["6"]}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(api.post, "/recommend", json=body)
        try:
            assert entered.wait(30), "the first request reached the model"
            shed = api.post("/recommend", json=body)
            assert_json_error(shed, 503)
            assert int(shed.headers["Retry-After"]) >= 1
            started = time.monotonic()
            assert api.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1, "/healthz does not wait for the model"
        finally:
            release.set()
        assert first.result(30).status_code == 200
    assert api.post("/recommend", json=body).status_code == 200, "admitted again once the queue drained"


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_health_routes_answer_while_the_ledger_hangs(make_api: Callable[..., TestClient]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    api = make_api(probe_timeout_s=0.5)
    gateway = api.app.state.gateway  # type: ignore[attr-defined]
    release = threading.Event()

    class Hanging:
        def __enter__(self) -> "Hanging":
            return self

        def __exit__(self, *_: Any) -> None:
            pass

        def __getattr__(self, _name: str) -> Callable[..., None]:
            def hang(*_args: Any, **_kwargs: Any) -> None:
                release.wait(30)
                raise OperationalError("SELECT", {}, RuntimeError("gone"))
            return hang

    real = gateway.sessions
    gateway.sessions = lambda: Hanging()
    try:
        with ThreadPoolExecutor(4) as pool:
            hung = [pool.submit(api.get, "/deletions/abc") for _ in range(4)]
            started = time.monotonic()
            assert api.get("/healthz").status_code == 200
            ready = api.get("/readyz")
            assert time.monotonic() - started < 3
            assert ready.status_code == 503 and ready.json()["checks"]["ledger"] == "timeout"
            release.set()
            assert all(f.result(30).status_code == 503 for f in hung)
    finally:
        release.set()
        gateway.sessions = real


# -- privacy of what remains ----------------------------------------------------------------------
def test_access_log_lines_carry_no_user_id(api: TestClient) -> None:
    import logging

    from service.redaction import ACCESS_LOGGER, RedactUserIds, redact_path

    assert redact_path("/users/u1/interactions?item_id=6&item_id=7") == "/users/{user_id}/interactions?{query}"
    assert redact_path("/users/u1/interactions") == "/users/{user_id}/interactions"
    assert redact_path("/recommend") == "/recommend"
    [redactor] = [f for f in logging.getLogger(ACCESS_LOGGER).filters if isinstance(f, RedactUserIds)]
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "DELETE", "/users/u1/interactions?item_id=6", "1.1", 202), None)
    assert redactor.filter(record)
    assert "u1" not in record.getMessage() and "item_id" not in record.getMessage()


def test_sql_errors_carry_no_parameters(ledger_url: str) -> None:
    engine = db.get_engine(ledger_url)
    with pytest.raises(Exception) as failure, engine.connect() as connection:
        connection.execute(text("SELECT * FROM no_such_table WHERE user_id = :user"), {"user": "secret-user-7"})
    assert "secret-user-7" not in str(failure.value)


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_the_quarantine_event_names_the_user_by_hmac_only(api: TestClient) -> None:
    import json

    import numpy as np

    from apa.hashing import hmac_hex
    from jobs import queue

    gateway = api.app.state.gateway  # type: ignore[attr-defined]
    settings = gateway.settings
    redis = queue.connect(settings.redis_url)
    pubsub = redis.pubsub()
    pubsub.subscribe(queue.Names(settings.redis_prefix).events)
    try:
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        for user in ("u1", "u2", "u3", "u4"):  # the first whose data trained a shard
            if api.delete(f"/users/{user}/interactions", headers=AUTH).json()["affected_shards"]:
                break
        message = pubsub.get_message(timeout=5)
        while message is not None and message["type"] != "message":
            message = pubsub.get_message(timeout=5)
        assert message is not None
        assert user.encode() not in message["data"]
        event = json.loads(message["data"])
        subject = hmac_hex(settings.hmac_secret(), "user", user)
        assert event["type"] == "quarantine" and event["subject"] == subject and "user_id" not in event
    finally:
        pubsub.close()
        redis.close()
    # another replica, holding u3's history embedding, drops it on the event
    histories = gateway.replica.histories
    histories.put(user, "the user's history", np.zeros(4), histories.epoch)
    histories.put("someone", "another history", np.zeros(4), histories.epoch)
    gateway.replica.on_event(event)
    assert user not in histories and "someone" in histories


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_ledger_key_and_run_files_are_owner_only(api: TestClient, tiny_run_template: Path, tmp_path: Path) -> None:
    from apa.settings import CoreSettings

    settings = api.app_settings if hasattr(api, "app_settings") else api.app.state.gateway.settings  # type: ignore[attr-defined]
    ledger_file = Path(settings.ledger_url.split("///", 1)[1])
    assert ledger_file.stat().st_mode & 0o777 == 0o600
    run = tiny_run_template / "runs" / "tiny"
    assert run.stat().st_mode & 0o777 == 0o700
    assert (run / "samples.parquet").stat().st_mode & 0o777 == 0o600
    CoreSettings(home=tmp_path / "keyhome").hmac_secret()
    assert (tmp_path / "keyhome" / "hmac.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_recommend_can_require_a_client_token(make_api: Callable[..., TestClient]) -> None:
    api = make_api(recommend_token="client-secret")
    body = {"user_id": "u1", "candidates": ["6"]}
    missing = api.post("/recommend", json=body)
    assert_json_error(missing, 401)
    assert_json_error(api.post("/recommend", json=body, headers={"Authorization": "Bearer nope"}), 403)
    assert api.post("/recommend", json=body, headers={"Authorization": "Bearer client-secret"}).status_code == 200
    assert api.post("/recommend", json=body, headers=AUTH).status_code == 200, "the admin token is accepted too"
    assert api.get("/healthz").status_code == 200, "health stays open"
    security = api.get("/openapi.json").json()["paths"]["/recommend"]["post"].get("security")
    assert security, "the bearer scheme is declared"
