"""The bound on time-to-forget (service/deadline.py): the stance follows the oldest open deletion's wait
as a fraction of APA_FORGET_DEADLINE_S; shedding answers 503 + Retry-After; overdue is visible."""

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from jobs import queue
from service import deadline as deadline_module
from service.deadline import Deadline, Policy
from tests.conftest import load_tiny, record_run, service_settings
from tests.service.test_flow import AUTH, run_worker, user_with_train_samples, wait_for
from worker.settings import WorkerSettings
from worker.tasks import WorkerContext, set_context

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_the_stance_follows_the_oldest_open_deletion() -> None:
    policy = Policy(deadline_s=100, yield_at=0.25, shed_at=0.75)
    assert [policy.stance(w) for w in (None, 0, 24.9, 25, 74.9, 75, 1000)] == [
        "normal", "normal", "normal", "yield", "yield", "shed", "shed"]
    state = Deadline(policy)
    assert state.waited_s(T0) is None and state.stance(T0) == "normal" and state.overdue(T0) == 0
    state.update([T0 + timedelta(seconds=50), T0])
    assert state.waited_s(T0 + timedelta(seconds=30)) == 30
    assert state.stance(T0 + timedelta(seconds=30)) == "yield"
    assert state.overdue(T0 + timedelta(seconds=120)) == 1
    assert state.overdue(T0 + timedelta(seconds=151)) == 2
    assert policy.overdue(T0, T0 + timedelta(seconds=100)) is False
    assert policy.overdue(T0, T0 + timedelta(seconds=101)) is True
    state.update([])
    assert state.stance() == "normal"


def test_the_model_thread_sleeps_after_a_batch_only_while_yielding(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(deadline_module.time, "sleep", slept.append)
    state = Deadline(Policy(deadline_s=100, yield_at=0.25, shed_at=0.75, yield_ratio=2.0))
    state.pause_after(0.1)
    state.update([datetime.now(UTC) - timedelta(seconds=30)])
    state.pause_after(0.1)
    assert slept == [pytest.approx(0.2)]


@pytest.fixture
def env(service_home: Path, redis_prefix: str, tiny_model_dir: Path, tmp_path: Path) -> Iterator[dict]:
    from service.app import create_app

    settings = service_settings(service_home, f"sqlite:///{tmp_path / 'apa.db'}", redis_prefix, tiny_model_dir,
                                forget_deadline_s=8.0, forget_yield_at=0.25, forget_shed_at=0.5,
                                shed_retry_after_s=3)
    record_run(settings)
    redis = queue.connect(settings.redis_url)
    set_context(WorkerContext(settings=WorkerSettings(**settings.model_dump(include=set(WorkerSettings.model_fields))),
                              base=load_tiny(tiny_model_dir), redis=redis))
    with TestClient(create_app(settings)) as client:
        yield {"client": client, "settings": settings, "redis": redis, "run_dir": service_home / "runs" / "tiny"}
    set_context(None)
    redis.close()


def test_a_deletion_past_its_deadline_sheds_recommend_until_it_completes_and_stays_marked_overdue(env: dict) -> None:
    client = env["client"]
    user, _ = user_with_train_samples(env["run_dir"])
    other = next(u for u in ("u1", "u2", "u3", "u4") if u != user)
    assert client.get("/admin/status", headers=AUTH).json()["forget"] == {
        "deadline_s": 8.0, "oldest_open_s": None, "overdue": 0, "stance": "normal"}
    request_id = client.delete(f"/users/{user}/interactions", headers=AUTH).json()["request_id"]
    assert client.get(f"/deletions/{request_id}").json()["overdue"] is False
    assert client.post("/recommend", json={"user_id": other, "candidates": ["1"]}).status_code == 200

    def shed() -> bool:
        return client.post("/recommend", json={"user_id": other, "candidates": ["1"]}).status_code == 503

    wait_for(shed, timeout_s=20.0)  # from 4 s (half the deadline) on, the retrain has the machine
    answer = client.post("/recommend", json={"user_id": other, "candidates": ["1"]})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "3"
    assert "deletion" in answer.json()["detail"]
    assert client.get("/healthz").status_code == 200  # health, deletions and admin routes still answer
    time.sleep(max(0.0, 8.1 - client.get("/admin/status", headers=AUTH).json()["forget"]["oldest_open_s"]))
    forget = client.get("/admin/status", headers=AUTH).json()["forget"]
    assert forget["stance"] == "shed" and forget["overdue"] == 1 and forget["oldest_open_s"] > 8.0
    assert client.get(f"/deletions/{request_id}").json()["overdue"] is True
    metrics = client.get("/metrics").text
    assert "apa_forget_overdue 1.0" in metrics and "apa_forget_stance 2.0" in metrics
    assert "apa_forget_deadline_seconds 8.0" in metrics
    assert "apa_recommend_shed_total 0.0" not in metrics

    run_worker(env)
    assert client.get(f"/deletions/{request_id}").json()["status"] == "completed"
    wait_for(lambda: not shed(), timeout_s=10.0)  # the swap lifts it
    assert client.get(f"/deletions/{request_id}").json()["overdue"] is True, "it missed its deadline: said so"
    forget = client.get("/admin/status", headers=AUTH).json()["forget"]
    assert forget == {"deadline_s": 8.0, "oldest_open_s": None, "overdue": 0, "stance": "normal"}
    wait_for(lambda: "apa_deletions_completed_overdue_total 1.0" in client.get("/metrics").text, timeout_s=10.0)
    assert "apa_forget_overdue 0.0" in client.get("/metrics").text
