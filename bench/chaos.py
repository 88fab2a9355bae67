"""Chaos: deletions while the worker is killed, at every named crash point and at random moments, on real
processes: ``apa serve``, ``apa worker``, a Redis server of its own and the ledger (a new schema in the
PostgreSQL that ``--postgres`` names, dropped afterwards, or a SQLite file with ``--sqlite``).

One world: a copy of the run, a fresh ledger, one gateway; one worker at a time, forked from a process
that imported torch once (``tests/support/zygote.py``). Each deletion (all of one user's interactions, a user
with training samples) is a trial:

* at a named point (``apa.faults.POINTS``, all the worker passes): the worker starts with
  ``APA_FAULT_POINT`` and dies there (exit 137, as a SIGKILL leaves it); for ``ingest.memory-written``
  the user first posts two ratings (this world's ingested samples join validation), which the dying
  worker is preparing;
* at a random moment (``--random`` of them): the running, idle worker gets SIGKILL a delay drawn
  uniformly in [0, ``--max-delay``] s after the DELETE's 202 (seeded by ``--seed``; each trial records
  the deletion's status at the kill, so kills that came after it completed are counted apart);

then a new worker starts, and the deletion must complete within ``--timeout`` s. Once it has, and has
been purged, the invariants of ``tests/worker/test_crash_points.py`` are checked: the certificate counts no
violation, no serving version's manifest names a deleted sample, every shard serves exactly one version,
the ledger and the disk agree (no unknown version folder, none missing, no temp path), no file under the
run names a deleted sample, nothing of the killed worker runs on, and no dead worker holds a scheduler lock.

Totals: completed, lost (not completed in time, or failed), faked (completed while a serving manifest
still names a deleted sample, or with violations on its certificate), invariant violations (failed
checks, each named in its trial), seconds from the DELETE to ``completed``. The validation gate is off
(``APA_GATE_MAX_AUC_DROP=1``): a refused version is a verdict on the model, not a crash.

    python -m bench.chaos --tiny --random 8 --out docs/results/chaos.json   (from the repository root: it
                                                                            reuses the tests' fault harness)
    python -m bench.chaos --run var/runs/small --random 4   # the real base model: minutes per retrain
"""

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from apa.faults import EXIT_CODE, POINTS
from apa.settings import get_settings
from bench.ingest import Catalog, ledger
from bench.machine import command_line, describe, write_report
from bench.quick import train_quick_run
from bench.stack import served_copy
from tests.conftest import build_tiny_model, build_tokenizer
from tests.support.faults import (
    AUTH,
    ROOT,
    Process,
    RedisServer,
    Stack,
    Zygote,
    delete,
    disk_agrees,
    ingested_done,
    purged,
    served_with,
    serving_versions,
    session_processes,
    stale_scheduler_locks,
    traces,
    wait_until,
)

PREFIX = "apa-fault:"  # tests.support.faults.Stack's
INGEST_POINT = "ingest.memory-written"
WORKER_POINTS = [p for p in POINTS if p != "training.epoch-saved"]  # that one is `apa train`'s resumable epochs
TINY = {"shards": 2, "train": 128, "valid": 32, "test": 32}


def tiny_run(work: Path, home: Path) -> tuple[Path, Path]:
    """The tests' tiny random Llama, and a MovieLens-100K run trained with it (seconds per retrain; the
    crash recovery under test does not depend on what the model learns). Returns (run, model)."""
    model = work / "tiny-llama"
    model.mkdir(parents=True)
    tokenizer = build_tokenizer(model)
    build_tiny_model(model, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    env = {**os.environ, "APA_HOME": str(home), "APA_BASE_MODEL_PATH": str(model)}
    subprocess.run([sys.executable, "-m", "cli", "train", "--shards", str(TINY["shards"]), "--train-samples",
                    str(TINY["train"]), "--valid-samples", str(TINY["valid"]), "--test-samples", str(TINY["test"]),
                    "--max-epochs", "1", "--no-single", "--no-sisa", "--no-ledger", "--out", str(work / "tiny-run")],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return work / "tiny-run", model


def users_with_training_samples(run: Path) -> list[str]:
    """Users with training samples, fewest samples first (each deletion retrains little)."""
    frame = pd.read_parquet(run / "samples.parquet")
    counts = frame.groupby("user_id")["split"].agg(lambda s: ((s == "train").sum(), len(s)))
    return [str(u) for u, (train, _) in sorted(counts.items(), key=lambda kv: (kv[1], str(kv[0]))) if train > 0]


class World:
    def __init__(self, stack: Stack, redis: RedisServer, ledger_url: str, run: Path, timeout_s: float) -> None:
        self.stack, self.redis, self.ledger_url, self.run, self.timeout_s = stack, redis, ledger_url, run, timeout_s
        self.catalog = Catalog(run)

    def trial(self, user: str, point: str | None, delay_s: float) -> dict[str, Any]:
        stack = self.stack
        out: dict[str, Any] = {"user": user, "kill": point or "random", "violations": []}
        if point is not None:
            dying = stack.start_worker(fault_point=point)
            if point == INGEST_POINT:
                sent = self.catalog.next(user, 2)
                answer = stack.http.post(f"/users/{user}/interactions", headers=AUTH, json={"interactions": sent})
                assert answer.status_code == 202, answer.text
            else:
                request_id, deleted, started = self._delete(user)
            out["point_reached"] = self._wait_exit(dying) == EXIT_CODE
            if point == INGEST_POINT:
                stack.start_worker()
                wait_until(lambda: all(ingested_done(self.ledger_url, f"{user}:{i['item_id']}:{i['timestamp']}")
                                       for i in sent), self.timeout_s, "the ingested samples prepared", poll_s=0.25)
                request_id, deleted, started = self._delete(user)
            else:
                stack.start_worker()
        else:
            dying = stack.start_worker()  # the last trial's dead worker is no longer counted (its checks waited)
            wait_until(lambda: stack.workers_alive() == 1, self.timeout_s, "the worker up", poll_s=0.25)
            request_id, deleted, started = self._delete(user)
            time.sleep(delay_s)
            out["delay_s"] = round(delay_s, 3)
            out["status_at_kill"] = stack.deletion(request_id)["status"]
            stack.kill_worker(dying)
            stack.start_worker()
        out["samples"] = len(deleted)
        self._finish(out, request_id, deleted, started, dying)
        return out

    def _delete(self, user: str) -> tuple[str, dict[str, list[str]], float]:
        started = time.monotonic()
        request_id, deleted = delete(self.stack, self.ledger_url, self.run, user)
        return request_id, deleted, started

    def _wait_exit(self, proc: Process) -> int | None:
        try:
            code = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stack.kill_worker(proc)
            return None
        self.stack.workers.remove(proc)
        return code

    def _finish(self, out: dict[str, Any], request_id: str, deleted: dict[str, list[str]], started: float,
                dead: Process) -> None:
        stack, failed = self.stack, out["violations"]
        deadline = started + self.timeout_s
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = stack.deletion(request_id)
            if state["status"] in ("completed", "failed"):
                break
            time.sleep(0.25)
        out["status"] = state.get("status")
        out["completed"] = state.get("status") == "completed"
        if not out["completed"]:
            failed.append(f"not completed: {state.get('status')}")
            self._stop_workers()
            return
        out["seconds"] = round(time.monotonic() - started, 2)
        faked = served_with(self.ledger_url, set(deleted))
        out["faked"] = bool(faked) or state["certificate"]["violations"] != 0
        if out["faked"]:
            failed.append(f"faked: certificate violations {state['certificate']['violations']}, served {faked}")
        client = self.redis.client()
        # each within a bound: the purge and the sweep are the worker's next steps; a dead worker's scheduler
        # lock is freed by the reconciler once the worker's heartbeat has expired
        checks = {"purged": (lambda: purged(self.ledger_url, request_id), 60),
                  "ledger == disk": (lambda: disk_agrees(self.ledger_url, self.run), 60),
                  "no dead worker's scheduler lock": (lambda: stale_scheduler_locks(client, PREFIX) == {}, 10)}
        for name, (check, bound_s) in checks.items():
            try:
                wait_until(check, bound_s, name, poll_s=0.25)
            except AssertionError:
                failed.append(name)
        client.close()
        if set(serving_versions(self.ledger_url).values()) != {("serving", 1)}:
            failed.append(f"serving versions: {serving_versions(self.ledger_url)}")
        if found := traces(self.run, deleted):
            failed.append(f"files naming a deleted sample: {found}")
        if left := session_processes(dead.pid):
            failed.append(f"processes of the killed worker: {left}")
        self._stop_workers()

    def _stop_workers(self) -> None:
        for proc in list(self.stack.workers):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            self.stack.workers.remove(proc)


def totals(trials: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [t["seconds"] for t in trials if t.get("seconds") is not None]
    named = [t for t in trials if t["kill"] != "random"]
    return {"deletions": len(trials), "completed": sum(t["completed"] for t in trials),
            "lost": sum(not t["completed"] for t in trials), "faked": sum(bool(t.get("faked")) for t in trials),
            "invariant_violations": sum(len(t["violations"]) for t in trials),
            "named_points_reached": f"{sum(bool(t.get('point_reached')) for t in named)}/{len(named)}",
            "random_kills_before_completed": sum(t.get("status_at_kill") not in (None, "completed") for t in trials),
            "seconds_to_completed": {"p50": round(statistics.median(seconds), 2) if seconds else None,
                                     "max": max(seconds, default=None)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--run", type=Path, help="trained run folder (copied; the copy is served)")
    given.add_argument("--quick", action="store_true", help="train bench/quick.py's run of the real model first")
    given.add_argument("--tiny", action="store_true",
                        help=f"the tests' tiny random Llama on MovieLens-100K (K={TINY['shards']}, "
                             f"{TINY['train']}/{TINY['valid']}/{TINY['test']} samples)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                       help="PostgreSQL database to make a schema in (default: the machine's)")
    where.add_argument("--sqlite", action="store_true", help="a SQLite ledger instead")
    parser.add_argument("--random", type=int, default=8, help="deletions with a SIGKILL at a random moment")
    parser.add_argument("--max-delay", type=float, default=1.5,
                        help="a random kill comes within this many s of the 202 (about a deletion's time, or more)")
    parser.add_argument("--points", nargs="*", default=WORKER_POINTS, choices=WORKER_POINTS, metavar="POINT",
                        help="named crash points to kill at, one deletion each (default: all the worker's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per deletion")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not (args.run or args.quick or args.tiny):
        parser.error("one of --run, --quick, --tiny is required")
    work = Path(tempfile.mkdtemp(prefix="apa-chaos-"))
    settings = get_settings()
    model = settings.base_model_dir
    home = work / "home"  # the served copy's: the assets (the dataset the ledger import reads) are APA_HOME's
    home.mkdir()
    (home / "assets").symlink_to(settings.assets_dir.resolve())
    if args.tiny:
        source, model = tiny_run(work, home)
    else:
        source = train_quick_run(work / "quick") if args.quick else args.run
    run = served_copy(source, home / "runs" / "chaos")
    users = users_with_training_samples(run)
    plan: list[str | None] = [*args.points, *[None] * args.random]
    if len(users) < len(plan):
        parser.error(f"the run has {len(users)} users with training samples, {len(plan)} deletions asked")
    rng = random.Random(args.seed)
    rng.shuffle(users)
    started = time.monotonic()
    load = [round(x, 2) for x in os.getloadavg()]
    redis = RedisServer(work / "redis")
    zygote = Zygote({**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                     "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}, work / "logs" / "zygote.log")
    trials: list[dict[str, Any]] = []
    try:
        with ledger(args, work, "chaos") as url:
            stack = Stack(home, url, redis.url, model, work / "logs", zygote=zygote, gate_max_auc_drop=1.0,
                          ingest_valid_fraction=1.0, request_timeout_s=600)
            try:
                subprocess.run([sys.executable, "-m", "cli", "ledger", "import", str(run)], env=stack.env,
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                stack.start_gateway()
                world = World(stack, redis, url, run, args.timeout)
                for n, (user, point) in enumerate(zip(users, plan, strict=False)):
                    t0 = time.monotonic()
                    result = world.trial(user, point, rng.uniform(0, args.max_delay))
                    trials.append(result)
                    print(f"[{n + 1}/{len(plan)}] kill {result['kill']}: {result['status']}"
                          f" in {result.get('seconds')} s, violations {result['violations']}"
                          f" ({time.monotonic() - t0:.0f} s)", flush=True)
            finally:
                stack.close()
    finally:
        zygote.close()
        redis.stop()
    report = {"benchmark": "chaos", "ledger": "sqlite" if args.sqlite else "postgresql",
              "model": "tiny random Llama (tests/conftest.py)" if args.tiny else str(model),
              "run": {"source": "tiny" if args.tiny else "quick" if args.quick else str(args.run),
                      "users": len(users)},
              "totals": totals(trials), "trials": trials, "wall_s": round(time.monotonic() - started, 1),
              "settings": {"max_delay_s": args.max_delay, "seed": args.seed, "timeout_s": args.timeout,
                           "stack": {k: v for k, v in stack.env.items() if k.startswith("APA_") and
                                     k not in ("APA_ADMIN_TOKEN", "APA_HMAC_KEY", "APA_DATABASE_URL", "APA_HOME",
                                               "APA_BASE_MODEL_PATH", "APA_REDIS_URL")}},
              "machine": {**describe(), "load_average_at_start": load,
                          "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
              "note": args.note, "command": command_line("-m bench.chaos")}
    print(json.dumps(report["totals"], indent=1))
    write_report(report, args.out)
    if report["totals"]["invariant_violations"] or report["totals"]["lost"]:
        print(f"kept {work} (every process's log is in logs/, the run in home/runs/chaos)", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
