"""``python -m tests.support.zygote``: a process that has imported what ``apa serve`` and ``apa worker`` import,
and forks one of them per request, so a test that starts many processes pays the imports (seconds on
a busy 2-core machine) once.

Requests come on stdin, one JSON line each: ``{"args": [...], "env": {...}, "log": path}``. The child
starts a session of its own (a test finds every process of a dead worker by its session id), takes
``env`` as its whole environment, writes stdout and stderr to ``log`` and runs ``apa <args>``.
On stdout the zygote answers ``pid <pid>`` for each request and ``exit <pid> <code>`` when a child
ends (killed by a signal: 128 + its number, as a shell says). Nothing here has started a thread pool
or opened a connection before it forks: no torch op has run.
"""

import json
import os
import sys
import threading
import time
import traceback

# imported for what importing them costs, once, before any fork
import peft  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

import service.app  # noqa: F401
import worker.ingest
import worker.main  # noqa: F401
from cli.main import main as apa_main


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())  # no Python-level lock a fork could copy while held


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.05)
            continue
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        say(f"exit {pid} {code}")


def child(request: dict) -> None:
    os.setsid()
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.closerange(3, 256)  # the zygote's stdin pipe and anything else it held
    sys.stdin = open(os.devnull)  # noqa: SIM115 - for the life of the process
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["apa", *request["args"]]
    code = 1
    try:
        apa_main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    threading.Thread(target=reap, name="reaper", daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        say(f"pid {pid}")


if __name__ == "__main__":
    main()
