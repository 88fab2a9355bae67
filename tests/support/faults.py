"""Real processes for fault tests: a gateway (``apa serve``) and workers (``apa worker``) on the tiny run,
started as subprocesses or forked from a zygote (``tests/support/zygote.py``) that paid the imports once, a
Redis server of the test's own (so it may be flushed or killed), and a TCP proxy in front of
PostgreSQL that can refuse or go silent. Everything on loopback, every wait bounded, every process
killed in ``close()``."""

import json
import os
import select as io_select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, select

from apa import artifacts
from apa.embeddings import EmbeddingCache
from jobs import queue
from ledger import catalog
from ledger.db import session_scope
from ledger.models import AdapterVersion, DeletionRequest, Interaction, Sample, SampleInteraction, Shard
from tests.conftest import ADMIN_TOKEN
from worker.scheduler import lock_key

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, RedisError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout_s:.0f} s")
        time.sleep(poll_s)


class RedisServer:
    """``redis-server --port <free> --save ''``: this test's own, flushed or killed at will."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for the fault tests"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.client().ping(), 10, "redis-server up")

    def client(self) -> Redis:
        return Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


class Proxy(threading.Thread):
    """A loopback TCP proxy to ``target``: ``pass`` forwards, ``refuse`` closes the listener and every
    connection (the server refuses), ``silent`` accepts and holds connections but forwards nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(name="proxy", daemon=True)
        self.target, self.port = target, free_port()
        self.mode = "pass"
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self.stopped = threading.Event()
        self.listener: socket.socket | None = None
        self._listen()
        self.start()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.listener = listener

    def set_mode(self, mode: str) -> None:
        with self.lock:
            self.mode = mode
            for client, server in self.pairs:
                for sock in (client, server):
                    if sock is not None and mode == "refuse":
                        sock.close()
            if mode == "refuse":
                self.pairs.clear()
                if self.listener is not None:
                    self.listener.close()
                    self.listener = None
            elif mode == "pass":
                for client, server in self.pairs:  # what was held while silent is dropped, not replayed
                    client.close()
                    if server is not None:
                        server.close()
                self.pairs.clear()
                if self.listener is None:
                    self._listen()

    def run(self) -> None:
        while not self.stopped.is_set():
            with self.lock:
                listener, mode = self.listener, self.mode
                sockets = [s for pair in self.pairs for s in pair if s is not None]
            if listener is not None:
                try:
                    client, _ = listener.accept()
                except (TimeoutError, OSError):
                    client = None
                if client is not None:
                    server = socket.create_connection(self.target) if mode == "pass" else None
                    with self.lock:
                        self.pairs.append((client, server))
            else:
                time.sleep(0.1)
            if mode != "pass" or not sockets:
                continue
            try:
                ready, _, _ = io_select.select(sockets, [], [], 0.05)
            except (OSError, ValueError):
                continue
            for sock in ready:
                self._forward(sock)

    def _forward(self, sock: socket.socket) -> None:
        with self.lock:
            pair = next((p for p in self.pairs if sock in p), None)
            if pair is None or self.mode != "pass":
                return
            other = pair[1] if sock is pair[0] else pair[0]
            try:
                data = sock.recv(65536)
                if data and other is not None:
                    other.sendall(data)
                    return
            except OSError:
                pass
            for s in pair:
                if s is not None:
                    s.close()
            self.pairs.remove(pair)

    def stop(self) -> None:
        self.set_mode("refuse")
        self.stopped.set()
        self.join(timeout=5)


class Forked:
    """A process the zygote forked: the part of ``subprocess.Popen`` that a stack uses."""

    def __init__(self, zygote: "Zygote", pid: int) -> None:
        self.zygote, self.pid = zygote, pid

    @property
    def returncode(self) -> int | None:
        return self.zygote.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.zygote.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # not reaped yet: the pid is still this process's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """``python -m tests.support.zygote``: forks ``apa <args>`` processes on request (``spawn``), each in a
    session of its own, and reports their exit codes."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.zygote"], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.changed = threading.Condition()
        self.pids: list[int] = []
        self.exits: dict[int, int] = {}
        self.reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            kind, *values = raw.decode().split()
            with self.changed:
                if kind == "pid":
                    self.pids.append(int(values[0]))
                elif kind == "exit":
                    self.exits[int(values[0])] = int(values[1])
                self.changed.notify_all()

    def spawn(self, args: list[str], env: dict[str, str], log: Path) -> Forked:
        assert self.proc.stdin is not None and self.proc.poll() is None, "the zygote is gone"
        with self.changed:
            self.proc.stdin.write((json.dumps({"args": args, "env": env, "log": str(log)}) + "\n").encode())
            self.proc.stdin.flush()
            if not self.changed.wait_for(lambda: self.pids, timeout=60):
                raise AssertionError("the zygote did not fork in 60 s")
            return Forked(self, self.pids.pop(0))

    def exit_code(self, pid: int) -> int | None:
        with self.changed:
            return self.exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self.changed:
            self.changed.wait_for(lambda: pid in self.exits, timeout=timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        self.proc.kill()  # its children live in sessions of their own; their stacks stop them
        self.proc.wait(timeout=10)
        self.reader.join(timeout=10)  # reads to the end of the pipe
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()


def session_processes(session_id: int) -> list[int]:
    """Pids of the live processes in a session (``/proc``): what is left of a process started with
    a session of its own, once it is dead, reparented children included."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, session
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


Process = subprocess.Popen[bytes] | Forked


class Stack:
    """A gateway and workers sharing one ledger, one Redis and one run copy: subprocesses, or forked
    from ``zygote``."""

    def __init__(self, home: Path, ledger_url: str, redis_url: str, model_dir: Path, logs: Path,
                 zygote: Zygote | None = None, **extra: object) -> None:
        self.home, self.logs, self.port, self.zygote = home, logs, free_port(), zygote
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "APA_HOME": str(home), "APA_DATABASE_URL": ledger_url, "APA_BASE_MODEL_PATH": str(model_dir),
            "APA_ADMIN_TOKEN": ADMIN_TOKEN, "APA_HMAC_KEY": "test-hmac-key", "APA_REDIS_URL": redis_url,
            "APA_REDIS_PREFIX": "apa-fault:", "APA_POLL_INTERVAL_S": "0.5", "APA_RECONCILE_INTERVAL_S": "1",
            "APA_HEARTBEAT_TTL_S": "2", "APA_LOCK_TTL_S": "20", "APA_BACKOFF_S": "0", "APA_NICE": "0",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            # the harness polls /admin/status as fast as it waits; the admin rate limit has its own tests
            "APA_ADMIN_RATE_PER_S": "1000", "APA_ADMIN_BURST": "10000",
            **{f"APA_{k.upper()}": str(v) for k, v in extra.items()},
        }
        self.gateway: Process | None = None
        self.workers: list[Process] = []
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30, trust_env=False)
        self._n = 0
        self._logs: list[Any] = []

    def _spawn(self, args: list[str], name: str, **env: str) -> Process:
        self._n += 1
        path = self.logs / f"{self._n:02d}-{name}.log"
        if self.zygote is not None and args[:2] == ["-m", "cli"]:
            return self.zygote.spawn(args[2:], {**self.env, **env}, path)
        log = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return subprocess.Popen([sys.executable, *args], env={**self.env, **env}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def start_gateway(self, ready: bool = True) -> None:
        self.gateway = self._spawn(["-m", "cli", "serve", "--port", str(self.port)], "gateway")
        if ready:
            self.wait_ready()

    def wait_ready(self) -> None:
        wait_until(lambda: self.http.get("/readyz", timeout=5).status_code == 200, 240, "gateway ready")

    def stop_gateway(self, sig: int = signal.SIGTERM) -> None:
        if self.gateway is not None:
            self.gateway.send_signal(sig)
            self.gateway.wait(timeout=30)
            self.gateway = None

    def start_worker(self, slow_marker: Path | None = None, fault_point: str = "") -> Process:
        """``fault_point``: the worker dies there (``apa.faults``)."""
        if slow_marker is None:
            proc = self._spawn(["-m", "cli", "worker"], f"worker-{fault_point}" if fault_point else "worker",
                               **({"APA_FAULT_POINT": fault_point} if fault_point else {}))
        else:
            proc = self._spawn(["-m", "tests.support.slow_worker", "worker"], "slow-worker",
                               APA_FAULT_MARKER=str(slow_marker))
        self.workers.append(proc)
        return proc

    def kill_worker(self, proc: Process) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        self.workers.remove(proc)

    def workers_alive(self) -> int | None:
        return self.status()["queue"]["workers"]

    def status(self) -> dict[str, Any]:
        answer = self.http.get("/admin/status", headers=AUTH)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def deletion(self, request_id: str) -> dict[str, Any]:
        return dict(self.http.get(f"/deletions/{request_id}").json())

    def wait_completed(self, request_id: str, timeout_s: float = 90) -> dict[str, Any]:
        return dict(wait_until(lambda: (d := self.deletion(request_id))["status"] == "completed" and d,
                               timeout_s, f"deletion {request_id} completed", poll_s=0.25))

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}"
                         for p in sorted(self.logs.glob("*.log")))

    def close(self) -> None:
        for proc in [*self.workers, *([self.gateway] if self.gateway else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, *([self.gateway] if self.gateway else [])]:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.workers, self.gateway = [], None
        self.http.close()
        for log in self._logs:
            log.close()


# -- what must hold once a deletion completed, whatever was killed on the way (tests/worker/test_crash_points.py,
# bench/chaos.py) ----------

def delete(stack: Stack, ledger_url: str, run: Path, user: str, item: str | None = None,
           ) -> tuple[str, dict[str, list[str]]]:
    """DELETE one interaction of ``user`` (all of them without ``item``); returns the request id and the
    samples they are in, with their prompts (the run's in samples.parquet, ingested ones' in the ledger)."""
    chosen = [Interaction.user_id == user, Interaction.deleted_at.is_(None)]
    if item is not None:
        chosen.append(Interaction.item_id == item)
    with session_scope(ledger_url) as session:
        rows = session.execute(select(Sample.sample_id, Sample.prompt, Sample.history_prompt).distinct()
                               .join(SampleInteraction, SampleInteraction.sample_id == Sample.sample_id)
                               .join(Interaction, Interaction.id == SampleInteraction.interaction_id)
                               .where(*chosen)).all()
    frame = pd.read_parquet(run / "samples.parquet").set_index("sample_id")
    deleted = {str(i): [p for p in (prompt, history) if p] or
               ([frame.at[i, "prompt"], frame.at[i, "history_prompt"]] if i in frame.index else [])
               for i, prompt, history in rows}
    assert deleted, "the interaction is in samples"
    answer = stack.http.delete(f"/users/{user}/interactions", params={} if item is None else {"item_id": item},
                               headers=AUTH)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["request_id"]), deleted


def ingested_done(ledger_url: str, sample_id: str) -> bool:
    with session_scope(ledger_url) as session:
        sample = session.get(Sample, sample_id)
        return sample is not None and (sample.trained_version is not None if sample.split == "train"
                                       else sample.prepared_at is not None)


def purged(ledger_url: str, request_id: str) -> bool:
    with session_scope(ledger_url) as session:
        request = session.get(DeletionRequest, request_id)
        return request is not None and request.purged_at is not None


def serving_versions(ledger_url: str) -> dict[int, tuple[str, int]]:
    """Per shard: its state and how many versions are serving (recorded served, not retired)."""
    with session_scope(ledger_url) as session:
        shards = session.scalars(select(Shard).order_by(Shard.shard)).all()
        serving = dict(session.execute(select(AdapterVersion.shard, func.count()).where(
            AdapterVersion.served_at.is_not(None), AdapterVersion.retired_at.is_(None))
            .group_by(AdapterVersion.shard)).all())
        return {s.shard: (s.state, int(serving.get(s.shard, 0))) for s in shards}


def served_with(ledger_url: str, sample_ids: set[str]) -> list[str]:
    """Serving versions whose manifest (read from disk) names one of ``sample_ids``: a deletion
    completed on paper only."""
    with session_scope(ledger_url) as session:
        paths = [Path(v.path) for v in catalog.shard_views(session=session) if v.path is not None]
    return [str(p) for p in paths
            if sample_ids & {s["sample_id"] for s in artifacts.read_json(p / "manifest.json")["samples"]}]


def stale_scheduler_locks(redis: Redis, prefix: str) -> dict[str, str]:
    """The scheduler locks of the queues under ``prefix`` held by a worker without a heartbeat."""
    alive = queue.live_workers(redis, prefix)
    owners = {q.name: redis.get(lock_key(q.name)) for q in queue.queues(redis, prefix)}
    return {name: owner.decode() for name, owner in owners.items() if owner is not None and owner.decode() not in alive}


def disk_agrees(ledger_url: str, run: Path) -> bool:
    with session_scope(ledger_url) as session:
        kept = catalog.kept_versions(session=session)
    shards = set(kept) | {int(p.name.removeprefix("shard-")) for p in (run / "adapters").glob("shard-*")}
    on_disk = {k: set(artifacts.versions(artifacts.shard_dir(run, k))) for k in shards}
    return {k: v for k, v in on_disk.items() if v} == kept and not artifacts.temp_paths(run)


def traces(run: Path, deleted: dict[str, list[str]]) -> list[str]:
    """Files under ``run`` that name a deleted sample: its id in a JSON file, in a parquet table's
    ``sample_id`` column or in the validation memory's ids; its prompts as embedding-cache entries."""
    ids = set(deleted)
    found = []
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        if path.suffix == ".json":
            hit = any(json.dumps(i) in path.read_text() for i in ids)
        elif path.suffix == ".parquet":
            hit = bool(ids & set(pd.read_parquet(path)["sample_id"].astype(str)))
        elif path.suffix == ".npz":
            with np.load(path) as data:
                hit = "sample_ids" in data.files and bool(ids & {str(s) for s in data["sample_ids"]})
        else:
            hit = any(i.encode() in path.read_bytes() for i in ids)
        if hit:
            found.append(str(path.relative_to(run)))
    cache = EmbeddingCache(run / "cache" / "embeddings", artifacts.read_json(run / "run.json")["base_model"]["sha256"])
    found += [str(cache.path(p).relative_to(run)) for prompts in deleted.values() for p in prompts
              if cache.path(p).is_file()]
    return found
