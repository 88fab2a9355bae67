"""The micro-batcher: concurrent submissions share one call on the model thread, each gets its slice."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.batching import MicroBatcher


def run(coro):
    return asyncio.run(coro)


def test_concurrent_submissions_share_one_call() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        return [x * x for x in items]

    async def scenario() -> list[list[int]]:
        batcher = MicroBatcher(square, executor=ThreadPoolExecutor(1), window_s=0.05, max_items=100)
        batcher.start()
        try:
            return await asyncio.gather(batcher.submit([1, 2]), batcher.submit([3]), batcher.submit([4, 5, 6]))
        finally:
            await batcher.stop()

    assert run(scenario()) == [[1, 4], [9], [16, 25, 36]]
    assert calls == [[1, 2, 3, 4, 5, 6]]


def test_max_items_splits_batches_and_errors_reach_every_waiter() -> None:
    calls: list[list[int]] = []

    def fail_on_seven(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 7 in items:
            raise ValueError("seven")
        return items

    async def scenario() -> tuple[list[int], list[BaseException | list[int]]]:
        batcher = MicroBatcher(fail_on_seven, executor=ThreadPoolExecutor(1), window_s=0.05, max_items=2)
        batcher.start()
        try:
            ok = await batcher.submit([1, 2])
            results = await asyncio.gather(batcher.submit([7]), batcher.submit([8]), return_exceptions=True)
            return ok, results
        finally:
            await batcher.stop()

    ok, results = run(scenario())
    assert ok == [1, 2]
    assert all(isinstance(r, ValueError) for r in results)
    assert calls == [[1, 2], [7, 8]]


@pytest.mark.parametrize("window", [0.0, 0.01])
def test_a_lone_request_is_not_held_back_long(window: float) -> None:
    async def scenario() -> list[int]:
        batcher = MicroBatcher(lambda items: items, executor=ThreadPoolExecutor(1), window_s=window, max_items=8)
        batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit([5]), timeout=2.0)
        finally:
            await batcher.stop()

    assert run(scenario()) == [5]
