"""Gateways on the tiny run for the service's tests (SQLite and PostgreSQL, the machine's Redis)."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import record_run, service_settings


@pytest.fixture
def api_options() -> dict[str, Any]:
    """Settings every gateway of a test module gets; a module overrides this fixture to change them."""
    return {}


@pytest.fixture
def make_api(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path,
             api_options: dict[str, Any]) -> Iterator[Callable[..., TestClient]]:
    """``make_api(**settings)``: a gateway (the first records the run in the ledger), its settings as
    ``client.app_settings``; a server error comes back as its 500 answer. All are closed after the test."""
    from service.app import create_app

    clients: list[TestClient] = []

    def make(**extra: Any) -> TestClient:
        settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir, **{**api_options, **extra})
        if not clients:
            record_run(settings)
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        client.app_settings = settings  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api(make_api: Callable[..., TestClient]) -> TestClient:
    return make_api()
