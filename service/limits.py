"""Bounded work: a request-body limit, a per-token rate limit, and admission to the model queue.

Each limit answers at once (413, 429 or 503 with ``Retry-After``) instead of queueing work that
would stall the event loop, the thread pool or the single model thread.
"""

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import Overloaded, error


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


class TokenBuckets:
    """One token bucket per key (a bearer token's HMAC): ``rate`` requests a second, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until it may (nothing is taken)."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate if self.rate > 0 else math.inf


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

