"""A bound on every request's time: past ``APA_REQUEST_TIMEOUT_S`` the client gets a JSON 503 with
``Retry-After`` instead of waiting on a ledger that went silent (no reply, no reset) or on a full
thread pool. The handler's thread cannot be interrupted; it runs on and its late answer is dropped.

A pure ASGI middleware: the request runs as its own task, awaited with a timeout but never cancelled
and awaited (cancelling a handler blocked in a worker thread waits for that thread).
"""

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger(__name__)

Scope = dict[str, Any]


class RequestTimeout:
    def __init__(self, app: Any, timeout_s: float, exempt: tuple[str, ...] = ()) -> None:
        self.app, self.timeout_s, self.exempt = app, timeout_s, exempt

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.timeout_s <= 0 or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        started = False
        timed_out = False

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if timed_out:
                return  # the 503 went out; the handler's late answer goes nowhere
            started = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, guarded_send))
        done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        if done:
            task.result()
            return
        if started:  # the answer is under way (e.g. a long body): let it finish
            await task
            return
        timed_out = True
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieve, never raise later
        log.warning("%s %s: no answer in %.1f s; 503", scope.get("method"), scope.get("path"), self.timeout_s)
        body = json.dumps({"detail": f"no answer within {self.timeout_s:g} s (the ledger or the model is not "
                                     "responding); try again"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"5"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
