"""A replica's two background loops, both ``jobs.periodic.Periodic``: the pub/sub listener (a
quarantine event applies at once) and the ledger poll (the fallback that catches up whatever an event
missed, or all of it while Redis is away)."""

import json
import logging
from typing import Any

from jobs.periodic import Periodic
from service.replica import Replica

log = logging.getLogger(__name__)

RECONNECT_S = 2.0


class EventListener(Periodic):
    """Subscribes to ``channel`` and hands every message to ``replica.on_event``.

    One round is one subscription: it reads until stopped, or until Redis fails it (the loop logs
    that and subscribes again ``RECONNECT_S`` later).
    """

    def __init__(self, redis: Any, channel: str, replica: Replica) -> None:
        super().__init__("events", self._listen, RECONNECT_S, immediately=True)
        self.redis, self.channel, self.replica = redis, channel, replica

    def _listen(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            while not self.stopped.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._handle(message["data"])
        finally:
            pubsub.close()

    def _handle(self, data: bytes) -> None:
        try:
            self.replica.on_event(json.loads(data))
        except Exception:  # the ledger poll retries what an event could not finish
            log.exception("event %r could not be applied", data[:200])


def ledger_poller(replica: Replica, interval_s: float) -> Periodic:
    """``replica.sync()`` every ``interval_s`` seconds."""
    return Periodic("ledger-poll", replica.sync, interval_s)
