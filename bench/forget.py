"""Time-to-forget against a running service on loopback, and coalescing of deletions during a retrain.

Starts its own gateway and worker (``apa serve``, ``apa worker``) on a *copy* of the given run folder
with a fresh SQLite ledger, so the run itself is never purged. Then:

1. ``--deletions`` times: DELETE a user whose training samples sit in one shard; measure DELETE → the
   first one-candidate ``/recommend`` (another user, who asked once before: a returning user, whose
   history embedding the gateway keeps unless ``--history-cache 0``) that leaves that shard out, and
   DELETE → ``completed``.
2. Coalescing: DELETE a user of shard s, wait until its retrain has started, DELETE ``--coalesce``
   more users of shard s at once, wait for all to complete; count the retrains of shard s (versions
   published). Target: at most 2.

Every wait is bounded (``--timeout``); every request count is bounded (``--max-probes``).

    python bench/forget.py --run var/runs/small --out docs/results/forget.json
    python bench/forget.py --quick          # trains its own K=2, 64/32/64, 1-epoch run first
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.client import Client
from bench.machine import command_line, describe, write_report
from bench.quick import train_quick_run
from bench.stack import gateway_and_worker, served_copy, service_env
from service.settings import ServiceSettings


def users_by_shard(run_dir: Path) -> dict[int, list[str]]:
    """Users whose training samples all sit in one shard, per shard (fewest interactions first)."""
    frame = pd.read_parquet(run_dir / "samples.parquet")
    train = frame[frame["split"] == "train"]
    shards = train.groupby("user_id")["shard"].agg(lambda s: sorted(set(s.tolist())))
    out: dict[int, list[str]] = {}
    for user, found in shards.items():
        if len(found) == 1:
            out.setdefault(int(found[0]), []).append(str(user))
    return {k: sorted(v, key=lambda u: (len(u), u)) for k, v in out.items()}


def wait_status(client: Client, request_id: str, wanted: set[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.deletion(request_id)
        if state["status"] in wanted or state["status"] == "failed":
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"deletion {request_id} still {state['status']} after {timeout_s:.0f} s")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained run folder (copied; the copy is served)")
    parser.add_argument("--deletions", type=int, default=2)
    parser.add_argument("--coalesce", type=int, default=4, help="deletions sent during one retrain")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--max-probes", type=int, default=50)
    parser.add_argument("--history-cache", type=int, default=None, metavar="N",
                        help="the gateway's APA_HISTORY_CACHE_SIZE (0: no cache; default: the service's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apa-forget-"))
    source = train_quick_run(work / "quick") if args.quick else args.run
    if source is None:
        parser.error("--run is required without --quick")
    run = served_copy(source, work / "served")
    env = service_env(f"sqlite:///{work / 'ledger.db'}")
    if args.history_cache is not None:
        env["APA_HISTORY_CACHE_SIZE"] = str(args.history_cache)
    with gateway_and_worker(run, env, work, args.port):
        client = Client(f"http://127.0.0.1:{args.port}", env["APA_ADMIN_TOKEN"])
        try:
            client.wait_ready()
            report = measure(client, run, args)
        finally:
            client.close()
    report["history_cache_size"] = int(env.get("APA_HISTORY_CACHE_SIZE", ServiceSettings().history_cache_size))
    report["machine"] = describe()
    report["command"] = command_line("bench/forget.py")
    print(json.dumps({k: v for k, v in report.items() if k != "forgets"}, indent=1))
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


def measure(client: Client, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    by_shard = users_by_shard(run)
    everyone = sorted({u for users in by_shard.values() for u in users})
    probe = everyone[-1]
    item = client.recommend(probe, top_k=1)["items"][0]["item_id"]
    forgets = []
    shards = sorted(by_shard, key=lambda k: -len(by_shard[k]))
    for i in range(args.deletions):
        shard = shards[i % len(shards)]
        user = by_shard[shard].pop(0)
        result = client.forget(user, probe_user=probe, probe_item=item, timeout_s=args.timeout,
                               max_probes=args.max_probes)
        forgets.append({"user_shard": shard, "request_id": result.request_id, "status": result.deletion["status"],
                        "seconds_to_quarantine": result.seconds_to_quarantine,
                        "seconds_to_completed": result.seconds_to_completed})
        print(f"deletion {i + 1}: quarantine {result.seconds_to_quarantine} s, completed "
              f"{result.seconds_to_completed} s", flush=True)

    shard = max(by_shard, key=lambda k: len(by_shard[k]))
    users = by_shard[shard][: args.coalesce + 1]
    version_before = next(s["version"] for s in client.status()["shards"] if s["shard"] == shard)
    first = client.delete_user(users[0])
    wait_status(client, first["request_id"], {"retraining", "completed"}, args.timeout)
    more = [client.delete_user(u) for u in users[1:]]
    finals = [wait_status(client, r["request_id"], {"completed"}, args.timeout) for r in [first, *more]]
    version_after = next(s["version"] for s in client.status()["shards"] if s["shard"] == shard)
    coalescing = {"shard": shard, "deletions": len(users), "sent_during_retrain": len(more),
                  "retrains": version_after - version_before, "statuses": [f["status"] for f in finals]}
    print(f"coalescing: {len(users)} deletions on shard {shard} -> {coalescing['retrains']} retrains", flush=True)
    quarantine = [f["seconds_to_quarantine"] for f in forgets if f["seconds_to_quarantine"] is not None]
    completed = [f["seconds_to_completed"] for f in forgets if f["seconds_to_completed"] is not None]
    return {"benchmark": "forget", "forgets": forgets,
            "time_to_quarantine_s": {"max": max(quarantine, default=None), "all": quarantine},
            "delete_to_completed_s": {"max": max(completed, default=None), "all": completed},
            "coalescing": coalescing}


if __name__ == "__main__":
    main()
