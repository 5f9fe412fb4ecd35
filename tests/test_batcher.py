"""The micro-batcher: size and wait limits, and that batches never mix queues."""

from __future__ import annotations

import asyncio

from workers.batcher import Batch, MicroBatcher


async def test_flushes_at_max_batch_size_and_at_max_wait() -> None:
    seen: list[list[int]] = []

    async def handler(batch: Batch[int]) -> None:
        seen.append(batch.items)

    batcher: MicroBatcher[int] = MicroBatcher(4, 0.05, handler)
    batcher.start()
    for i in range(10):
        batcher.put(i)
    await batcher.drain()
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    batcher.put(10)
    await asyncio.sleep(0.01)
    assert seen[-1] == [8, 9]  # still waiting for company
    await batcher.drain()
    assert seen[-1] == [10]
    await batcher.stop()


async def test_batches_grow_while_the_handler_is_busy() -> None:
    seen: list[int] = []

    async def slow(batch: Batch[int]) -> None:
        seen.append(len(batch.items))
        await asyncio.sleep(0.05)

    batcher: MicroBatcher[int] = MicroBatcher(64, 0.0, slow)
    batcher.start()
    batcher.put(0)
    await asyncio.sleep(0.01)
    for i in range(20):
        batcher.put(i)
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
