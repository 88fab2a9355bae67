"""Bounded work: a request-body limit, per-token rate limits (shared by the replicas), and admission to
the model queue.

Each limit answers at once (413, 429 or 503 with ``Retry-After``) instead of queueing work that
would stall the event loop, the thread pool or the single model thread.
"""

import logging
import math
import time
from typing import Any

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.errors import ConfigurationError
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, error

log = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` is a 413 before any JSON is parsed.

    Checked from ``Content-Length`` first, then while reading (chunked bodies, lying headers); the
    body, at most ``max_bytes``, is buffered and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await self._too_large(scope, receive, send)
                return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error(413, f"request body over {self.max_bytes} bytes", {"Connection": "close"})
        await response(scope, receive, send)


class RateLimiter:
    """Per-token rate limits shared by every replica: a moving window of ``burst`` requests per
    ``burst / rate`` seconds for each (limit, key), kept in Redis by the ``limits`` library, so N replicas
    grant one token its limit once, not N times. If Redis cannot be reached the replica falls back to a
    window of its own (in memory) rather than refusing or waving through every request."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        storage = RedisStorage(redis_url, key_prefix=prefix, socket_connect_timeout=2, socket_timeout=2)
        self._shared = MovingWindowRateLimiter(storage)
        self._local = MovingWindowRateLimiter(MemoryStorage())

    @staticmethod
    def item(rate: float, burst: int) -> RateLimitItem:
        return RateLimitItemPerSecond(burst, max(1, math.ceil(burst / rate)))

    def take(self, name: str, key: str, *, rate: float, burst: int) -> float:
        """0 when the request may go ahead (it is counted); else the seconds until it may."""
        item = self.item(rate, burst)
        try:
            return self._take(self._shared, item, name, key)
        except (RedisError, ConfigurationError, OSError):
            log.warning("rate limits: Redis unavailable, this replica counts alone", exc_info=True)
            return self._take(self._local, item, name, key)

    @staticmethod
    def _take(limiter: MovingWindowRateLimiter, item: RateLimitItem, name: str, key: str) -> float:
        if limiter.hit(item, name, key):
            return 0.0
        reset = limiter.get_window_stats(item, name, key).reset_time
        return max(0.001, reset - time.time())


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(min(seconds, 3600))))}


class Admission:
    """At most ``limit`` requests wait for (or use) the model; the next one is refused, not queued.

    Used on the event loop only, so a plain counter is enough.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting = 0

    def __enter__(self) -> "Admission":
        if self.waiting >= self.limit:
            raise Overloaded(f"{self.waiting} requests already wait for the model; try again shortly")
        self.waiting += 1
        return self

    def __exit__(self, *_: Any) -> None:
        self.waiting -= 1

