"""Real processes for fault tests: a gateway (``apa serve``) and workers (``apa worker``) on the tiny run,
started as subprocesses or forked from a zygote (``tests/zygote.py``) that paid the imports once, a
Redis server of the test's own (so it may be flushed or killed), and a TCP proxy in front of
PostgreSQL that can refuse or go silent. Everything on loopback, every wait bounded, every process
killed in ``close()``."""

import json
import os
import select
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
from redis import Redis
from redis.exceptions import RedisError

from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


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
                ready, _, _ = select.select(sockets, [], [], 0.05)
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
    """``python -m tests.zygote``: forks ``apa <args>`` processes on request (``spawn``), each in a
    session of its own, and reports their exit codes."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.zygote"], env=env, cwd=ROOT,
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
        if self.zygote is not None and args[:2] == ["-m", "apa.cli"]:
            return self.zygote.spawn(args[2:], {**self.env, **env}, path)
        log = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        return subprocess.Popen([sys.executable, *args], env={**self.env, **env}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

    def start_gateway(self, ready: bool = True) -> None:
        self.gateway = self._spawn(["-m", "apa.cli", "serve", "--port", str(self.port)], "gateway")
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
            proc = self._spawn(["-m", "apa.cli", "worker"], f"worker-{fault_point}" if fault_point else "worker",
                               **({"APA_FAULT_POINT": fault_point} if fault_point else {}))
        else:
            proc = self._spawn(["-m", "tests.slow_worker", "worker"], "slow-worker",
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
