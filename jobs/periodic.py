"""One background loop for both processes: a daemon thread that runs a task every ``interval_s``.

The gateway's ledger poll and event listener and the worker's reconciler and heartbeat are all this
loop. A task that raises is logged and run again after the interval (the next round may find the
ledger or Redis back); ``stop()`` wakes the wait at once, so a stopped thread ends as soon as the
round in progress returns.
"""

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic(threading.Thread):
    """Run ``task`` every ``interval_s`` seconds (first right away with ``immediately``) until ``stop()``."""

    def __init__(self, name: str, task: Callable[[], object], interval_s: float, *,
                 immediately: bool = False) -> None:
        super().__init__(name=name, daemon=True)
        self.task, self.interval_s, self.immediately = task, interval_s, immediately
        self.stopped = threading.Event()  # a long task may watch it to return early

    def run(self) -> None:
        if self.immediately and not self.stopped.is_set():
            self._round()
        while not self.stopped.wait(self.interval_s):
            self._round()

    def _round(self) -> None:
        try:
            self.task()
        except Exception:
            log.exception("%s failed; next round in %g s", self.name, self.interval_s)

    def stop(self) -> None:
        """Ask the loop to end (``join`` waits for the round in progress)."""
        self.stopped.set()
