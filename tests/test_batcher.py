"""The micro-batcher: size and wait limits, and that batches never mix queues."""

from __future__ import annotations

import asyncio

from workers.batcher import Batch, MicroBatcher


async def test_flushes_at_max_batch_size_and_at_max_wait() -> None:
    seen: list[list[int]] = []
    waited: list[float] = []

    async def handler(batch: Batch[int]) -> None:
        seen.append(batch.items)
        waited.append(batch.waited_s)

    batcher: MicroBatcher[int] = MicroBatcher(4, 0.05, handler)
    batcher.start()
    for i in range(10):
        batcher.put(i)
    await batcher.drain()
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batcher.put(10)
    await batcher.drain()
    assert seen[-1] == [10]
    # alone, it was held for company until max_wait (measured on the loop's clock from its
    # put; a flush at once would show ~0); 1 us for the loop's timer resolution
    assert waited[-1] >= 0.05 - 1e-6, waited
    await batcher.stop()


async def test_batches_grow_while_the_handler_is_busy() -> None:
    seen: list[int] = []
    busy, release = asyncio.Event(), asyncio.Event()

    async def slow(batch: Batch[int]) -> None:
        seen.append(len(batch.items))
        busy.set()
        await release.wait()  # busy until the test says so

    batcher: MicroBatcher[int] = MicroBatcher(64, 0.0, slow)
    batcher.start()
    batcher.put(0)
    async with asyncio.timeout(5):
        await busy.wait()  # the first batch is in the handler
    for i in range(20):
        batcher.put(i)
    release.set()
    await batcher.drain()
    await batcher.stop()
    assert seen == [1, 20]


async def test_a_handler_that_raises_does_not_end_the_batcher_nor_hang_drain() -> None:
    seen: list[list[int]] = []
    failed: list[tuple[list[int], str]] = []

    async def handler(batch: Batch[int]) -> None:
        if 0 in batch.items:
            raise RuntimeError("handler bug")
        seen.append(batch.items)

    async def on_error(batch: Batch[int], exc: BaseException) -> None:
        failed.append((batch.items, str(exc)))

    batcher: MicroBatcher[int] = MicroBatcher(2, 0.0, handler, on_error=on_error)
    batcher.start()
    batcher.put(0)
    async with asyncio.timeout(2):
        await batcher.drain()
    batcher.put(1)
    async with asyncio.timeout(2):
        await batcher.drain()
    assert failed == [([0], "handler bug")] and seen == [[1]]
    await batcher.stop()


async def test_told_nothing_more_a_lone_job_does_not_wait_for_company() -> None:
    """After ``nothing_more`` (the worker handed over all it fetched), a batch closes once
    the queue is empty: one job at a time pays no max_wait; a fetched chunk still comes in
    full batches; a job put after the hint waits for company again."""
    seen: list[list[int]] = []
    waited: list[float] = []

    async def handler(batch: Batch[int]) -> None:
        seen.append(batch.items)
        waited.append(batch.waited_s)

    batcher: MicroBatcher[int] = MicroBatcher(4, 1.0, handler)
    batcher.start()
    batcher.put(0)
    batcher.nothing_more()
    await asyncio.wait_for(batcher.drain(), 0.5)  # max_wait is a second
    assert seen == [[0]] and waited[0] < 0.1, waited
    for i in range(1, 10):
        batcher.put(i)
    batcher.nothing_more()
    await asyncio.wait_for(batcher.drain(), 0.5)
    assert seen[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    # a lone job waiting for company is released by a later hint, before its max_wait
    batcher.put(10)
    await asyncio.sleep(0.2)
    assert seen[-1] == [9]  # still waiting: no hint since it was put
    batcher.put(11)
    batcher.nothing_more()
    await asyncio.wait_for(batcher.drain(), 0.5)
    assert seen[-1] == [10, 11] and 0.2 <= waited[-1] < 0.6, waited
    await batcher.stop()
