"""Load during a deletion and its hot-swap: a gateway and a worker on loopback, clients at a fixed concurrency.

Starts its own gateway and worker (``apa serve``, ``apa worker``) on a *copy* of ``--run`` with a fresh
SQLite ledger and a Redis key prefix of its own. ``--concurrency`` clients send ``--requests``
``/recommend`` requests in all (``--candidates`` candidates each, users in turn). When a quarter of them
are sent, one interaction is deleted: the target of a training sample that sits in no other training
sample's history, so exactly one shard is quarantined and retrained. Reported:

* errors: answers other than 200 and the deadline policy's 503 (``shed``), and transport errors;
* latency p50 / p99 / max of the answered requests, and throughput;
* time to forget: 202 → ``completed``; whether the hot-swapped version answered while the load ran;
* ``quarantined_uses_after_202``: requests *sent* after the 202 whose answer names the affected shard at
  its old version (``adapters`` in the answer say which shard versions scored it). Must be 0.

Every wait is bounded (``--timeout``).

    python -m bench.load --run var/runs/small --requests 2000 --concurrency 16 --out docs/results/load.json
    python -m bench.load --run <run> --quick     # 200 requests at concurrency 8
"""

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from bench.client import Client
from bench.machine import command_line, describe, write_report
from bench.stack import gateway_and_worker, served_copy, service_env


def one_shard_target(run: Path) -> tuple[str, str, int]:
    """(user, item, shard) of a training sample whose target is in no other training sample."""
    frame = pd.read_parquet(run / "samples.parquet")
    train = frame[frame["split"] == "train"]
    contained: dict[str, int] = {}
    for keys in train["interaction_keys"]:
        for key in keys:
            contained[str(key)] = contained.get(str(key), 0) + 1
    for row in train.sort_values("sample_id").itertuples():
        if contained.get(str(row.sample_id), 0) == 1:
            return str(row.user_id), str(row.target_item_id), int(row.shard)
    raise SystemExit("no training sample's target is in one training sample only")


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (copied; the copy is served)")
    parser.add_argument("--base-model", type=Path, help="base model folder (default: APA_BASE_MODEL_PATH / assets)")
    parser.add_argument("--home", type=Path, help="APA_HOME holding the run's dataset (default: APA_HOME / var)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true", help="200 requests at concurrency 8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.concurrency = 200, 8
    work = Path(tempfile.mkdtemp(prefix="apa-load-"))
    run = served_copy(args.run, work / "served")
    env = service_env(f"sqlite:///{work / 'ledger.db'}", prefix="apa-load",
                      **{k: v for k, v in os.environ.items() if k == "APA_REDIS_PREFIX"})  # a test's own prefix
    if args.base_model:
        env["APA_BASE_MODEL_PATH"] = str(args.base_model)
    if args.home:
        env["APA_HOME"] = str(args.home)
    with gateway_and_worker(run, env, work, args.port):
        client = Client(f"http://127.0.0.1:{args.port}", env["APA_ADMIN_TOKEN"], timeout_s=120)
        try:
            client.wait_ready(timeout_s=min(args.timeout, 600))
            report = measure(client, run, args)
        finally:
            client.close()
    report["machine"] = describe()
    report["command"] = command_line("-m bench.load")
    print(json.dumps(report, indent=1))
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


def measure(client: Client, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    user, item, shard = one_shard_target(run)
    frame = pd.read_parquet(run / "samples.parquet")
    users = sorted({str(u) for u in frame["user_id"]})
    items = sorted({str(i) for i in frame["target_item_id"]})[: max(1, args.candidates)]
    old_version = next(s["version"] for s in client.status()["shards"] if s["shard"] == shard)
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    sent = {"n": 0}
    delete_at = args.requests // 4
    reached, forgotten = threading.Event(), threading.Event()
    # with ``until_forgotten``, clients go on past ``requests`` until the deletion ends (or its wait
    # times out), and 5 s more, so answers from the swapped version are seen under load
    until_forgotten = getattr(args, "until_forgotten", False)

    def worker() -> None:
        with httpx.Client(base_url=str(client.http.base_url), timeout=args.timeout, trust_env=False) as http:
            while True:
                with lock:
                    if sent["n"] >= args.requests and (forgotten.is_set() or not until_forgotten):
                        return
                    n = sent["n"]
                    sent["n"] += 1
                if n >= delete_at:
                    reached.set()
                started = time.monotonic()
                record: dict[str, Any] = {"sent": started}
                try:
                    r = http.post("/recommend", json={"user_id": users[n % len(users)], "candidates": items})
                    record["status"] = r.status_code
                    if r.status_code == 200:
                        record["adapters"] = [(a["shard"], a["version"]) for a in r.json()["adapters"]]
                except httpx.HTTPError as exc:
                    record["status"] = type(exc).__name__
                record["seconds"] = time.monotonic() - started
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    reached.wait(timeout=args.timeout)
    accepted = client.delete_user(user, [item])
    accepted_at = time.monotonic()
    request_id = accepted["request_id"]
    completed_at = None
    deadline = accepted_at + args.timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = client.deletion(request_id)
        if state["status"] in ("completed", "failed"):
            completed_at = time.monotonic()
            break
        time.sleep(0.2)
    if until_forgotten and completed_at is not None:
        time.sleep(5.0)
    forgotten.set()
    for thread in threads:
        thread.join(timeout=max(1.0, deadline - time.monotonic()))
    finished = time.monotonic()

    ok = [r for r in records if r["status"] == 200]
    shed = [r for r in records if r["status"] == 503]
    errors = [r for r in records if r["status"] not in (200, 503)]
    after = [r for r in ok if r["sent"] > accepted_at]
    stale = [r for r in after if (shard, old_version) in r.get("adapters", [])]
    swapped = [r for r in ok if r["sent"] > accepted_at and any(s == shard and v > old_version
                                                                for s, v in r.get("adapters", []))]
    latencies = [r["seconds"] for r in ok]
    certificate = state.get("certificate") or {}
    return {
        "benchmark": "load", "requests": len(records), "concurrency": args.concurrency,
        "candidates_per_request": len(items), "ok": len(ok), "shed_503": len(shed), "errors": len(errors),
        "error_statuses": sorted({str(r["status"]) for r in errors}),
        "latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                       "max": percentile(latencies, 100)},
        "throughput_rps": round(len(records) / (finished - started), 2),
        "deletion": {"shard": shard, "old_version": old_version, "status": state.get("status"),
                     "overdue": state.get("overdue"), "sent_after_requests": delete_at,
                     "time_to_forget_s": None if completed_at is None else round(completed_at - accepted_at, 2),
                     "certificate_violations": certificate.get("violations")},
        "requests_sent_after_202": len([r for r in records if r["sent"] > accepted_at]),
        "quarantined_uses_after_202": len(stale),
        "swapped_version_answers_under_load": len(swapped),
    }


if __name__ == "__main__":
    main()
