"""Micro-batching: concurrent requests' prompts share forward passes, off the event loop.

Each request submits its prompts; a collector waits up to ``window_s`` for more (or until
``max_items``), runs one blocking call for all of them on the single model thread, and hands each
request its results. Torch work never runs on the event loop.
"""

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    items: Sequence[T]
    future: "asyncio.Future[list[R]]"


class MicroBatcher(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], Sequence[R]], *, executor: Executor, window_s: float,
                 max_items: int) -> None:
        self._run, self._executor = run, executor
        self._window_s, self._max_items = window_s, max_items
        self._queue: asyncio.Queue[_Pending[T, R]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # calls made (for tests and metrics)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, items: Sequence[T]) -> list[R]:
        future: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(items, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0].items)
            deadline = loop.time() + self._window_s
            while size < self._max_items:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    group.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
                size += len(group[-1].items)
            flat: list[T] = [item for pending in group for item in pending.items]
            try:
                results: Any = await loop.run_in_executor(self._executor, self._run, flat)
            except Exception as exc:  # hand the error to every waiting request
                for pending in group:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            self.batches += 1
            start = 0
            for pending in group:
                if not pending.future.done():
                    pending.future.set_result(list(results[start:start + len(pending.items)]))
                start += len(pending.items)
