"""The benchmarks' service stack (bench/stack.py): a copied run keeps what its source forgot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from apa.hashing import hmac_hex
from apa.purge import FORGOTTEN
from bench.stack import served_copy, service_env
from ledger import catalog, db


def test_a_served_copy_imported_with_the_bench_environment_does_not_bring_forgotten_ratings_back(
        service_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source run forgot u1's rating of item 5 (its HMAC under this environment's key is in
    ``forgotten.json``, as a purge leaves it): the benchmark's own ledger must not hold it again."""
    monkeypatch.setenv("APA_HOME", str(service_home))
    monkeypatch.delenv("APA_HMAC_KEY", raising=False)
    source = service_home / "runs" / "tiny"
    (service_home / "hmac.key").write_text("the-demo-key")
    (source / FORGOTTEN).write_text(json.dumps([hmac_hex(b"the-demo-key", "interaction", "u1:5:500")]))
    copy = served_copy(source, tmp_path / "served")
    url = f"sqlite:///{tmp_path / 'bench.db'}"
    env = service_env(url)
    subprocess.run([sys.executable, "-m", "cli", "ledger", "import", str(copy)], env=env, check=True,
                   capture_output=True)
    with db.session_scope(url) as session:
        history = dict(catalog.live_history(session=session, user_id="u1"))
    assert history and "5" not in history
