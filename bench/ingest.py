"""Online learning against a running service on loopback: ingestion throughput, `/recommend` beside it,
and how soon new data is used and trained.

Starts its own gateway and worker (``apa serve``, ``apa worker``) on a *copy* of the given run folder,
with a fresh ledger: a new schema in the PostgreSQL that ``--postgres`` names (dropped afterwards), or
a SQLite file with ``--sqlite``. Then:

1. ``/recommend`` p50 for a few returning users, alone, then with ``--ingest-rate`` (20) ingestion
   requests a second beside it (one interaction each, other users), then alone again (the worker may
   still be embedding what was ingested); the machine's load average is recorded with each;
2. ingestion throughput: ``--batches`` requests of ``--batch`` interactions, sequential (interactions/s,
   the ledger work of each request in one transaction);
3. POST → the next ``/recommend`` using the new history (the rated item is no longer offered);
4. POST → a served version that trained on it: a second stack with ``APA_INGEST_MIN_SAMPLES=1``; the
   new version's manifest is read to check that it names the new sample.

    python bench/ingest.py --run var/runs/small --out docs/results/ingest.json
    python bench/ingest.py --quick          # trains its own K=2, 64/32/64, 1-epoch run first
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import create_engine, text

from bench.client import APIError, Client
from bench.machine import command_line, describe, write_report
from bench.quick import train_quick_run
from bench.stack import gateway_and_worker, served_copy, service_env

T0 = 900_000_000  # 1998-07-09: after MovieLens-100K's last rating, accepted by the API
SENDERS = 8  # concurrent ingestion clients beside /recommend


@contextmanager
def ledger(args: argparse.Namespace, work: Path, name: str) -> Iterator[str]:
    """A fresh ledger URL: a schema of its own in PostgreSQL, or a SQLite file."""
    if args.sqlite:
        yield f"sqlite:///{work / f'{name}.db'}"
        return
    schema = f"apa_bench_{secrets.token_hex(4)}"
    admin = create_engine(args.postgres)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{args.postgres}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def free_port() -> int:
    """A port nothing listens on now (a fixed one may be another benchmark's on a shared machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def stack(args: argparse.Namespace, source: Path, work: Path, name: str,
          **extra: str) -> Iterator[tuple[Client, Path]]:
    port = args.port or free_port()
    run = served_copy(source, work / name / "run")
    with ledger(args, work, name) as url:
        # a busy 2-core machine: a cold first /recommend is slow
        env = service_env(url, APA_INGEST_RATE_PER_S="1000", APA_INGEST_BURST="1000",
                          APA_REQUEST_TIMEOUT_S="900", **extra)
        with gateway_and_worker(run, env, work / name, port):
            client = Client(f"http://127.0.0.1:{port}", env["APA_ADMIN_TOKEN"])
            try:
                client.wait_ready()
                yield client, run
            finally:
                client.close()


class Catalog:
    """Per user, items not rated yet and the next timestamp (every ingested interaction is new)."""

    def __init__(self, run: Path) -> None:
        frame = pd.read_parquet(run / "samples.parquet")
        rated: dict[str, set[str]] = {}
        for row in frame.itertuples(index=False):
            rated.setdefault(str(row.user_id), set()).update(str(i) for i in row.history_item_ids)
            rated[str(row.user_id)].add(str(row.target_item_id))
        items = sorted({i for seen in rated.values() for i in seen}, key=int)
        counts = frame["target_item_id"].astype(str).value_counts()
        self.popular = [str(i) for i in counts.index]
        self.users = sorted(rated, key=int)
        self.unrated = {u: [i for i in items if i not in seen] for u, seen in rated.items()}
        self.clock = T0
        self.lock = threading.Lock()

    def next(self, user: str, n: int = 1) -> list[dict[str, Any]]:
        with self.lock:
            picked, self.unrated[user] = self.unrated[user][:n], self.unrated[user][n:]
            out = [{"item_id": item, "rating": 1 + (self.clock + k) % 5, "timestamp": self.clock + k}
                   for k, item in enumerate(picked)]
            self.clock += n
            return out


def recommend_p50(client: Client, users: list[str], rounds: int, candidates: list[str]) -> dict[str, Any]:
    times = []
    for i in range(rounds):
        started = time.perf_counter()
        client.recommend(users[i % len(users)], candidates, top_k=5)
        times.append(time.perf_counter() - started)
    return {"requests": rounds, "candidates": len(candidates), "p50_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3)}


def beside(client: Client, catalog: Catalog, users: list[str], rate: float, stop: threading.Event,
           sent: list[float]) -> None:
    """Single-interaction ingestions (other users) at ``rate`` a second, until ``stop``: each of
    ``SENDERS`` threads keeps its share of the schedule, so a slow answer does not lower the rate."""
    started = time.perf_counter()

    def send(lane: int) -> None:
        i = lane
        while not stop.is_set():
            if (wait := started + i / rate - time.perf_counter()) > 0:
                stop.wait(wait)
                continue
            user = users[i % len(users)]
            t = time.perf_counter()
            client.ingest(user, catalog.next(user))
            sent.append(time.perf_counter() - t)
            i += SENDERS

    lanes = [threading.Thread(target=send, args=(lane,)) for lane in range(SENDERS)]
    for lane in lanes:
        lane.start()
    for lane in lanes:
        lane.join()


def phase_serving(args: argparse.Namespace, source: Path, work: Path) -> dict[str, Any]:
    with stack(args, source, work, "serving", APA_INGEST_MIN_SAMPLES="1000000") as (client, run):
        catalog = Catalog(run)
        probes, others = catalog.users[:args.probe_users], catalog.users[args.probe_users:]
        candidates = catalog.popular[:args.candidates]
        recommend_p50(client, probes, len(probes), candidates)  # warm: each probe user's history and prefix cached
        alone = recommend_p50(client, probes, args.rounds, candidates)
        loads = [os.getloadavg()[0]]
        stop, sent = threading.Event(), list[float]()
        began = time.perf_counter()
        ingestion_client = Client(str(client.http.base_url), None)
        ingestion_client.http.headers.update(client.http.headers)
        thread = threading.Thread(target=beside, args=(ingestion_client, catalog, others, args.ingest_rate, stop, sent))
        thread.start()
        try:
            busy = recommend_p50(client, probes, args.rounds, candidates)
            loads.append(os.getloadavg()[0])
        finally:
            stop.set()
            thread.join()
            ingestion_client.close()
        achieved = len(sent) / (time.perf_counter() - began)
        backlog = client.status()["ingest"]["unplaced_samples"]
        after = recommend_p50(client, probes, args.rounds, candidates)
        print(f"/recommend p50 alone {alone['p50_s']} s, with ingestion {busy['p50_s']} s, after it "
              f"{after['p50_s']} s (the worker still placing {backlog} samples)", flush=True)

        started = time.perf_counter()
        for i in range(args.batches):
            user = others[i % len(others)]
            client.ingest(user, catalog.next(user, args.batch))
        elapsed = time.perf_counter() - started
        throughput = {"requests": args.batches, "batch": args.batch,
                      "interactions_per_s": round(args.batches * args.batch / elapsed, 1),
                      "request_s": round(elapsed / args.batches, 4)}
        print(f"ingestion: {throughput['interactions_per_s']} interactions/s", flush=True)

        user = probes[0]
        offered = client.recommend(user, top_k=5)["items"][0]["item_id"]  # the default candidates
        t0 = time.perf_counter()
        stamp = catalog.next(user)[0]["timestamp"]
        answer = client.ingest(user, [{"item_id": offered, "rating": 5, "timestamp": stamp}])
        post_s = time.perf_counter() - t0
        answered = client.recommend(user, top_k=20)
        used_s = time.perf_counter() - t0
        visible = {"post_s": round(post_s, 3), "post_to_recommend_s": round(used_s, 3),
                   "rated_item_no_longer_offered": offered not in [i["item_id"] for i in answered["items"]],
                   "samples": answer["samples"]}
        return {"recommend_alone": {**alone, "load_average": loads[0]},
                "recommend_after": {**after, "unplaced_samples_when_ingestion_stopped": backlog},
                "recommend_with_ingestion": {**busy, "load_average": loads[1],
                                             "ingest_rate_per_s": args.ingest_rate,
                                             "ingest_rate_achieved_per_s": round(achieved, 2),
                                             "ingestions_sent": len(sent),
                                             "ingest_p50_s": round(statistics.median(sent), 4) if sent else None},
                "throughput": throughput, "new_history": visible}


def phase_training(args: argparse.Namespace, source: Path, work: Path) -> dict[str, Any]:
    with stack(args, source, work, "training", APA_INGEST_MIN_SAMPLES="1",
               APA_INGEST_VALID_FRACTION="0") as (client, run):
        catalog = Catalog(run)
        user = catalog.users[0]
        before = {s["shard"]: s["version"] for s in client.status()["shards"]}
        interaction = catalog.next(user)[0]
        t0 = time.perf_counter()
        answer = client.ingest(user, [interaction])
        sample_id = f"{user}:{interaction['item_id']}:{interaction['timestamp']}"
        deadline = time.monotonic() + args.timeout
        while True:
            status = client.status()
            changed = [s for s in status["shards"] if s["version"] != before[s["shard"]] and s["state"] == "serving"]
            if changed and not any(s["pending_samples"] for s in status["shards"]) \
                    and not status["ingest"]["unplaced_samples"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no version trained on {sample_id} after {args.timeout:.0f} s")
            time.sleep(0.5)
        trained_s = time.perf_counter() - t0
        shard = changed[0]
        manifest = json.loads((run / "adapters" / f"shard-{shard['shard']}" / f"v{shard['version']}" /
                               "manifest.json").read_text())
        named = sample_id in {s["sample_id"] for s in manifest["samples"]}
        print(f"POST -> served version trained on it: {trained_s:.1f} s (shard {shard['shard']} "
              f"v{shard['version']}, manifest names it: {named})", flush=True)
        return {"post_to_trained_version_s": round(trained_s, 1), "shard": shard["shard"],
                "version": shard["version"], "manifest_names_sample": named, "samples": answer["samples"],
                "shard_samples": shard["n_samples"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained run folder (copied; the copy is served)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                       help="PostgreSQL database to make a schema in (default: the machine's)")
    where.add_argument("--sqlite", action="store_true", help="a SQLite ledger instead")
    parser.add_argument("--probe-users", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20, help="/recommend requests per measurement")
    parser.add_argument("--candidates", type=int, default=20, help="candidates per measured /recommend")
    parser.add_argument("--ingest-rate", type=float, default=20.0, help="ingestion requests/s beside /recommend")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100, help="interactions per throughput request")
    parser.add_argument("--port", type=int, default=0, help="the gateways' port (default: a free one each)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="apa-ingest-"))
    source = train_quick_run(work / "quick") if args.quick else args.run
    if source is None:
        parser.error("--run is required without --quick")
    if args.quick:
        args.rounds, args.batches, args.candidates = min(args.rounds, 8), min(args.batches, 10), 5
    try:
        report: dict[str, Any] = {"benchmark": "ingest", "ledger": "sqlite" if args.sqlite else "postgresql",
                                  **phase_serving(args, source, work), **phase_training(args, source, work)}
    except APIError as exc:
        raise SystemExit(f"the service refused: {exc}") from exc
    report["machine"] = describe()
    report["command"] = command_line("bench/ingest.py")
    print(json.dumps(report, indent=1))
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
