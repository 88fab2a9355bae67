"""The DELETE use case without HTTP or a model (service/deletions/service.py): the order of its steps,
a repeated request that changes nothing, and a Redis outage that loses nothing."""

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from service.deletions import service as deletion_service
from service.deletions.service import DeletionService
from service.metrics import Metrics
from service.settings import ServiceSettings


class Recorder:
    """Stands in for the replica, the session and Redis; every call is one entry of ``steps``."""

    def __init__(self) -> None:
        self.steps: list[tuple[Any, ...]] = []
        self.attention = SimpleNamespace(drop=lambda ids: self.steps.append(("drop valid", list(ids))))

    @contextmanager
    def quarantined_until_committed(self, shards: Sequence[int]) -> Iterator[None]:
        self.steps.append(("quarantine", list(shards)))
        yield
        self.steps.append(("quarantine no longer pending",))

    def forget_user(self, user_id: str) -> None:
        self.steps.append(("forget", user_id))

    def commit(self) -> None:
        self.steps.append(("commit",))


def deletion(shards: list[int], *, created: bool = True) -> Any:
    request = SimpleNamespace(id="r1", status="quarantined" if shards else "completed", affected_shards=shards,
                              subject_hmac="user-hmac")
    return SimpleNamespace(created=created, request=request, valid_sample_ids=["v1"])


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(deletion_service.queue, "enqueue_retrain",
                        lambda redis, settings, shard: recorder.steps.append(("enqueue retrain", shard)))
    monkeypatch.setattr(deletion_service.queue, "publish",
                        lambda redis, prefix, event: recorder.steps.append(("publish", event)))
    monkeypatch.setattr(deletion_service.queue, "enqueue_purge",
                        lambda redis, prefix: recorder.steps.append(("enqueue purge",)))
    return recorder


def request(recorder: Recorder, outcome: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Metrics]:
    monkeypatch.setattr(deletion_service.deletions, "request_deletion", lambda **kwargs: outcome)
    metrics = Metrics()
    service = DeletionService(settings=ServiceSettings(hmac_key="k", redis_prefix="t:"),  # type: ignore[arg-type]
                              replica=recorder, redis=None, metrics=metrics)  # type: ignore[arg-type]
    answer = service.request(session=recorder, user_id="u1", item_ids=None, token_hmac="t",  # type: ignore[arg-type]
                             idempotency_key=None, received=0.0)
    return answer, metrics


def test_quarantine_before_the_commit_then_forget_then_wake_the_worker(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    answer, metrics = request(recorder, deletion([1, 3]), monkeypatch)
    assert answer.id == "r1"
    assert recorder.steps == [
        ("drop valid", ["v1"]),
        ("quarantine", [1, 3]), ("commit",), ("quarantine no longer pending",),
        ("forget", "u1"),
        ("enqueue retrain", 1), ("enqueue retrain", 3),
        ("publish", {"type": "quarantine", "shards": [1, 3], "subject": "user-hmac"}),
    ]
    assert metrics.registry.get_sample_value("apa_deletion_requests_total", {"first_status": "quarantined"}) == 1


def test_no_shard_affected_enqueues_the_purge(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    request(recorder, deletion([]), monkeypatch)
    assert recorder.steps[-2:] == [("forget", "u1"), ("enqueue purge",)]


def test_a_repeated_request_changes_nothing(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    answer, _ = request(recorder, deletion([1], created=False), monkeypatch)
    assert answer.id == "r1" and recorder.steps == []


def test_redis_down_is_logged_and_the_request_stands(
        recorder: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def refused(*args: Any) -> None:
        raise ConnectionError("redis away")

    monkeypatch.setattr(deletion_service.queue, "enqueue_retrain", refused)
    with caplog.at_level(logging.WARNING, logger="service.deletions.service"):
        answer, _ = request(recorder, deletion([2]), monkeypatch)
    assert answer.id == "r1" and ("commit",) in recorder.steps and ("forget", "u1") in recorder.steps
    assert "reconciler will pick it up" in caplog.text
