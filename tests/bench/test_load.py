"""``bench/load.py --quick`` on the tiny run: real gateway and worker, 200 /recommend requests at
concurrency 8 with a deletion and its hot-swap in the middle. No errors, no quarantined shard used
after the 202, the deletion completed with a clean certificate."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL
from tests.support.faults import ROOT, free_port

pytestmark = pytest.mark.slow


def test_load_quick_during_a_deletion(tiny_run_template: Path, tiny_model_dir: Path, tmp_path: Path,
                                      redis_prefix: str) -> None:
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "APA_REDIS_URL": REDIS_URL, "APA_REDIS_PREFIX": redis_prefix, "APA_NICE": "0", "OMP_NUM_THREADS": "1"}
    bench = subprocess.Popen([sys.executable, "-m", "bench.load", "--run", str(tiny_run_template / "runs" / "tiny"),
                              "--base-model", str(tiny_model_dir), "--home", str(tiny_run_template), "--quick",
                              "--port", str(free_port()), "--timeout", "300", "--out", str(out)],
                             env=env, cwd=ROOT, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        assert bench.wait(timeout=900) == 0
    finally:  # the bench's gateway and worker share its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
    report = json.loads(out.read_text())
    assert report["requests"] == 200 and report["concurrency"] == 8
    assert report["errors"] == 0, report["error_statuses"]
    assert report["quarantined_uses_after_202"] == 0
    assert report["requests_sent_after_202"] > 0
    assert report["deletion"]["status"] == "completed" and report["deletion"]["certificate_violations"] == 0
    assert report["latency_ms"]["p50"] is not None
