"""The service as the benchmarks run it: a copy of the run, an environment of its own, the run imported into
a ledger, then `apa serve` and `apa worker` as subprocesses, stopped (and killed if they hang) whatever
happens."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from apa.settings import CoreSettings


def served_copy(source: Path, run: Path) -> Path:
    """``source`` copied to ``run`` without its ledger files and logs: the copy is what a benchmark serves
    (and deletes from), the source stays as it was."""
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("*.db", "*.db-*", "logs"))
    return run


def service_env(ledger_url: str, *, prefix: str = "apa-bench", **settings: str) -> dict[str, str]:
    """The environment of a benchmark's own gateway and worker: this process's, the ledger, an admin token of
    their own, a Redis prefix of their own (``<prefix>-<random>:``), then ``settings``. The HMAC key stays this
    environment's (``APA_HMAC_KEY`` or ``<APA_HOME>/hmac.key``): a copied run's ``forgotten.json`` holds its
    deleted interactions' HMACs under that key, and importing the copy under another key would bring them
    back into the benchmark's ledger."""
    return {**os.environ, "APA_DATABASE_URL": ledger_url, "APA_ADMIN_TOKEN": secrets.token_urlsafe(16),
            "APA_HMAC_KEY": CoreSettings().hmac_secret().decode(),
            "APA_REDIS_PREFIX": f"{prefix}-{secrets.token_hex(4)}:", **settings}


@contextmanager
def gateway_and_worker(run: Path, env: dict[str, str], work: Path, port: int) -> Iterator[None]:
    """Import ``run`` into the ledger ``env`` names, start the gateway on ``port`` and one worker, with
    their output in ``work``/gateway.log and worker.log. A port something already answers on is refused:
    the benchmark would measure that other server."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is in use by another server; pass another --port")
    subprocess.run([sys.executable, "-m", "cli", "ledger", "import", str(run)], env=env, check=True)
    with open(work / "gateway.log", "w") as gateway_log, open(work / "worker.log", "w") as worker_log:
        procs = [subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)], env=env,
                                  stdout=gateway_log, stderr=subprocess.STDOUT),
                 subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, stdout=worker_log,
                                  stderr=subprocess.STDOUT)]
        try:
            yield
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
