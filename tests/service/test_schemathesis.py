"""schemathesis against a live gateway on loopback (tiny run, real ledger and a Redis prefix): every
operation, authenticated, bounded examples; no server error, and every status, body and content type
as the OpenAPI schema declares them."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, record_run, service_settings

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"


@pytest.fixture
def live_gateway(service_home: Path, ledger_url: str, redis_prefix: str, tiny_model_dir: Path) -> Iterator[str]:
    import uvicorn

    from service.app import create_app

    # limits high enough that the fuzzer explores instead of meeting 429s; they are tested elsewhere
    settings = service_settings(service_home, ledger_url, redis_prefix, tiny_model_dir,
                                admin_rate_per_s=1000.0, admin_burst=1000)
    record_run(settings)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the gateway did not start"
        time.sleep(0.2)
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    yield url
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_schemathesis_finds_no_failure(live_gateway: str, tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    if cli is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[dev]'")
    command = [cli, "run", f"{live_gateway}/openapi.json", "--checks", CHECKS, "--max-examples", "20",
               "--header", f"Authorization: Bearer {ADMIN_TOKEN}", "--workers", "1", "--seed", "1",
               "--phases", "examples,coverage,fuzzing", "--request-timeout", "60"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    print(result.stdout[-1200:])  # the summary: operations, phases, test cases generated
