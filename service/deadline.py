"""The bound on time-to-forget: serving load may slow a deletion's retrain, never starve it.

A deletion is owed within ``APA_FORGET_DEADLINE_S`` of its request. Each replica learns from the
ledger (every sync) when the open deletions (quarantined or retraining) were made, and from the
oldest one's wait, as a fraction of the deadline, it picks a stance:

* ``normal`` below ``forget_yield_at``;
* ``yield`` from ``forget_yield_at``: after each forward batch the model thread sleeps
  ``forget_yield_ratio`` times the batch's own time, so serving takes at most 1 / (1 + ratio) of the
  CPU and the (niced) worker gets the rest;
* ``shed`` from ``forget_shed_at``: ``/recommend`` answers 503 with ``Retry-After`` (health, deletions
  and admin routes still answer) until the retrain is live, so the worker has the machine alone.

Past the deadline a deletion is *overdue*: ``apa_forget_overdue`` counts open ones (alert on > 0),
``/admin/status`` and ``/deletions/{id}`` say so. Shedding cannot help a deletion whose worker is
gone or whose shard failed its gate; the worker count and the ``failed`` status say that.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ledger.models import utcnow

Stance = Literal["normal", "yield", "shed"]
STANCE_LEVEL: dict[Stance, int] = {"normal": 0, "yield": 1, "shed": 2}


class LoadShed(Exception):
    """``/recommend`` is shed while a deletion waits past ``forget_shed_at`` of its deadline."""

    def __init__(self, retry_after_s: int, waited_s: float) -> None:
        super().__init__(f"shedding /recommend: a deletion has waited {waited_s:.0f} s; its retrain has the "
                         f"machine until it is live")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Policy:
    deadline_s: float
    yield_at: float = 0.25
    shed_at: float = 0.75
    yield_ratio: float = 1.0

    def stance(self, waited_s: float | None) -> Stance:
        if waited_s is None:
            return "normal"
        if waited_s >= self.shed_at * self.deadline_s:
            return "shed"
        return "yield" if waited_s >= self.yield_at * self.deadline_s else "normal"

    def overdue(self, created_at: datetime, completed_at: datetime | None, now: datetime | None = None) -> bool:
        end = completed_at or now or utcnow()
        return (end - created_at).total_seconds() > self.deadline_s


class Deadline:
    """One replica's view of the open deletions (replaced whole by each ledger sync)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._open: tuple[datetime, ...] = ()

    def update(self, open_created: Sequence[datetime]) -> None:
        self._open = tuple(sorted(open_created))

    def waited_s(self, now: datetime | None = None) -> float | None:
        """How long the oldest open deletion has waited; None when none is open."""
        if not self._open:
            return None
        return max(0.0, ((now or utcnow()) - self._open[0]).total_seconds())

    def stance(self, now: datetime | None = None) -> Stance:
        return self.policy.stance(self.waited_s(now))

    def overdue(self, now: datetime | None = None) -> int:
        """Open deletions already past the deadline."""
        now = now or utcnow()
        return sum(1 for created in self._open if self.policy.overdue(created, None, now))

    def pause_after(self, batch_s: float) -> None:
        """Called on the model thread after each batch: sleep while yielding to the retrain."""
        if self.stance() != "normal" and self.policy.yield_ratio > 0:
            time.sleep(batch_s * self.policy.yield_ratio)
