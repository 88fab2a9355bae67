"""The gateway under load on loopback, with prefix sharing on and off, side by side in one run.

Serves a *copy* of the given run from a temp home (its own SQLite ledger, its own Redis key prefix on
the machine's Redis) with the real ``apa serve`` in two subprocesses, one with
``APA_PREFIX_SHARING=true`` and one with ``false``. Both run side by side, idle in turn: each
concurrency level is measured with sharing on, then off, so a drift in the machine's load hits both
alike. Each ``/recommend`` names no candidates, so the gateway scores the user's 20 most popular
unrated items; every request is a different user (a first request: the history embedding is computed
too), the same users for both settings. Per concurrency level: p50/p99 latency,
candidates scored per second, errors; per gateway: peak resident memory (VmHWM). Then, with sharing on
and a worker beside the gateway, the same load while one interaction is deleted and its shard retrained
and hot-swapped (``bench.load``'s phase: errors, latency, time to forget, quarantined uses after the
202, which must be 0). Every request count is bounded and every request has a timeout (``--timeout``;
the gateway's own request timeout and admission limit are raised to it, so the unshared path at
concurrency 16 is measured, not shed).

    python bench/serving.py --run <run folder> --out docs/results/serving.json
    python bench/serving.py --quick --out docs/results/serving-quick.json   # trains the small run first
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench import load as hot_swap_load
from bench.client import Client
from bench.machine import command_line, describe, write_report
from bench.quick import train_quick_run
from bench.stack import gateway_and_worker, served_copy, service_env

ASSETS = Path("var/assets")


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (Linux VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def load(client: Client, users: list[str], concurrency: int, timeout_s: float) -> dict[str, Any]:
    """``users`` requests, ``concurrency`` at a time; latency per request, candidates per second."""

    def one(user: str) -> tuple[float, int, str | None]:
        started = time.perf_counter()
        try:
            body = client.recommend(user, top_k=100)
        except Exception as exc:  # counted, not raised: a load test reports its errors
            return time.perf_counter() - started, 0, f"{type(exc).__name__}: {str(exc)[:200]}"
        if body["fallback"]:
            return time.perf_counter() - started, 0, "fallback answer (no model used)"
        return time.perf_counter() - started, len(body["items"]), None

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, users, timeout=timeout_s))
    wall = time.perf_counter() - started
    latencies = np.array([r[0] for r in results])
    scored = sum(r[1] for r in results)
    errors = [r[2] for r in results if r[2] is not None]
    return {"requests": len(users), "concurrency": concurrency, "errors": len(errors), "error_examples": errors[:3],
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_s": round(float(np.percentile(latencies, 99)), 3),
            "mean_s": round(float(latencies.mean()), 3), "wall_s": round(wall, 3),
            "candidates_scored": scored, "candidates_per_s": round(scored / wall, 2)}


def gateway(env: dict[str, str], port: int, sharing: bool, log: Path) -> tuple[subprocess.Popen[bytes], Any]:
    handle = open(log, "w")  # noqa: SIM115 (closed by the caller with the process)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port)],
                            env={**env, "APA_PREFIX_SHARING": str(sharing).lower()},
                            stdout=handle, stderr=subprocess.STDOUT)
    return proc, handle


def measure(env: dict[str, str], args: argparse.Namespace, users: list[str], work: Path) -> dict[str, Any]:
    levels = [1, 4, 16] if args.full else [1, 4]
    per_level = {1: args.requests, 4: 2 * args.requests, 16: 4 * args.requests}
    need = 1 + sum(per_level[c] for c in levels)
    if len(users) < need:
        raise SystemExit(f"the run has {len(users)} users; {need} are needed (one per request)")
    names = {True: "sharing_on", False: "sharing_off"}
    report: dict[str, Any] = {}
    with ExitStack() as stack:  # both gateways up at once, idle in turn: each level is measured on, then off,
        clients, procs = {}, {}  # so a drift in the machine's load hits both settings alike
        for i, (sharing, name) in enumerate(names.items()):
            proc, handle = gateway(env, args.port + i, sharing, work / f"gateway-{name}.log")
            stack.callback(handle.close)
            stack.callback(proc.wait, timeout=60)
            stack.callback(proc.terminate)
            procs[name] = proc
            clients[name] = stack.enter_context(
                closing(Client(f"http://127.0.0.1:{args.port + i}", timeout_s=args.timeout)))
        for name, client in clients.items():
            client.wait_ready(timeout_s=args.timeout)
            started = time.perf_counter()
            client.recommend(users[0], top_k=1)  # warm-up: first forward, lazy imports; not measured
            report[name] = {"warmup_s": round(time.perf_counter() - started, 3)}
        rest = users[1:]
        for c in levels:
            batch, rest = rest[:per_level[c]], rest[per_level[c]:]
            for name, client in clients.items():
                report[name][f"c{c}"] = load(client, batch, c, args.timeout)
                print(f"{name} c={c}: {json.dumps(report[name][f'c{c}'])}", flush=True)
        for name, proc in procs.items():
            report[name]["peak_rss_mb"] = peak_rss_mb(proc.pid)
    on, off = report["sharing_on"], report["sharing_off"]
    report["speedup"] = {
        f"c{c}": {"p50": round(off[f"c{c}"]["p50_s"] / on[f"c{c}"]["p50_s"], 2),
                  "throughput": round(on[f"c{c}"]["candidates_per_s"] / max(off[f"c{c}"]["candidates_per_s"], 1e-9), 2)}
        for c in levels}
    return report


def hot_swap(env: dict[str, str], args: argparse.Namespace, run: Path, work: Path) -> dict[str, Any]:
    """Sharing on, a worker beside the gateway: load at concurrency 4 while a deletion retrains and
    hot-swaps one shard."""
    phase = work / "hot-swap"
    phase.mkdir()
    # the time-to-forget policy bounds the retrain under load: past a quarter of the deadline the model
    # thread yields to it, past three quarters /recommend is shed (503, counted apart from errors)
    env = {**env, "APA_FORGET_DEADLINE_S": str(args.forget_deadline)}
    with gateway_and_worker(run, env, phase, args.port):
        client = Client(f"http://127.0.0.1:{args.port}", token=env["APA_ADMIN_TOKEN"], timeout_s=args.timeout)
        try:
            client.wait_ready(timeout_s=args.timeout)
            client.recommend(hot_swap_load.one_shard_target(run)[0], top_k=1)  # warm-up, not measured
            load_args = argparse.Namespace(requests=4 * args.requests, concurrency=4, candidates=20,
                                           timeout=args.timeout, until_forgotten=True)
            result = hot_swap_load.measure(client, run, load_args)
        finally:
            client.close()
    print(f"hot-swap: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="trained run folder (copied; the copy is served)")
    parser.add_argument("--quick", action="store_true", help="fewer requests (trains the small run unless --run)")
    parser.add_argument("--full", action="store_true", help="also concurrency 16")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests at concurrency 1 (2x at 4, 4x at 16); default 8, --quick 2")
    parser.add_argument("--no-hot-swap", action="store_true", help="skip the load during a deletion's hot-swap")
    parser.add_argument("--forget-deadline", type=float, default=300.0,
                        help="APA_FORGET_DEADLINE_S during the hot-swap phase, seconds")
    parser.add_argument("--port", type=int, default=8766, help="the sharing-on gateway; sharing off uses the next port")
    parser.add_argument("--timeout", type=float, default=900.0, help="per request and per wait, seconds")
    parser.add_argument("--note", default="", help="recorded with the result (e.g. what else loaded the machine)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.requests is None:
        args.requests = 2 if args.quick else 8
    work = Path(tempfile.mkdtemp(prefix="apa-serving-"))
    source = args.run if args.run is not None else train_quick_run(work / "quick") if args.quick else None
    if source is None:
        parser.error("--run is required without --quick")
    home = work / "home"
    (home / "runs").mkdir(parents=True)
    (home / "assets").symlink_to(ASSETS.resolve())
    run = served_copy(source, home / "runs" / "served")
    env = service_env(f"sqlite:///{home / 'apa.db'}", APA_HOME=str(home),
                      # throughput, not the overload policy: neither the request timeout nor admission sheds here
                      APA_REQUEST_TIMEOUT_S=str(args.timeout), APA_MAX_MODEL_WAITING="1024")
    subprocess.run([sys.executable, "-m", "cli", "ledger", "import", str(run)], env=env, check=True)
    frame = pd.read_parquet(run / "samples.parquet")
    users = sorted({str(u) for u in frame["user_id"]}, key=lambda u: (len(u), u))
    try:
        report: dict[str, Any] = {"benchmark": "serving", "candidates_per_request": 20,
                                  **measure(env, args, users, work)}
        if not args.no_hot_swap:
            report["hot_swap"] = hot_swap(env, args, run, work)
    except BaseException:
        print(f"logs kept in {work}", file=sys.stderr)
        raise
    report["machine"] = describe()
    report["note"] = args.note
    report["command"] = command_line("bench/serving.py")
    print(json.dumps(report, indent=1))
    print("sharing on vs off: " + ", ".join(
        f"c={c[1:]} p50 {s['p50']}x faster, throughput {s['throughput']}x" for c, s in report["speedup"].items()))
    if "hot_swap" in report:
        swap = report["hot_swap"]
        print(f"during a hot-swap: {swap['errors']} errors in {swap['requests']} requests, "
              f"{swap['quarantined_uses_after_202']} quarantined uses after the 202, "
              f"time to forget {swap['deletion']['time_to_forget_s']} s")
    write_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
