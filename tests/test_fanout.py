"""The fan-out of frames to readers: every frame once, in order, whether the reader keeps up,
falls behind (it catches up from the log) or joins late."""

from __future__ import annotations

import asyncio
from pathlib import Path

from reconciler import fanout
from state import events


async def test_a_reader_that_falls_behind_still_gets_every_frame_once_in_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.events.jsonl"
    log, hub = events.EventLog(path), fanout.Hub()
    sub = hub.subscribe("t", path)
    for i in range(fanout.QUEUE_FRAMES + 50):  # more than a reader may hold in memory
        hub.publish("t", log.append("token", {"t": "x", "i": i}, ts="t"))
    got: list[int] = []

    async def read() -> None:
        async for frame in sub.frames():
            got.append(frame.id)

    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0.01)
    for i in range(10):  # and more while it reads
        hub.publish("t", log.append("token", {"t": "y", "i": i}, ts="t"))
        await asyncio.sleep(0)
    hub.publish("t", log.append("end", {"tokens_out": 0}, ts="t"))
    await asyncio.wait_for(reader, 5)
    assert got == list(range(1, fanout.QUEUE_FRAMES + 50 + 10 + 2))
    assert hub.count("t") == 0


async def test_frames_published_together_arrive_as_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "t.events.jsonl"
    log, hub = events.EventLog(path), fanout.Hub()
    hub.publish("t", log.append("queued", {}, ts="t"))
    sub = hub.subscribe("t", path)
    batches = sub.batches()
    assert [f.id for f in await anext(batches)] == [1]  # from the log
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)
    for i in range(5):
        hub.publish("t", log.append("token", {"t": "x", "i": i}, ts="t"))
    assert [f.id for f in await asyncio.wait_for(waiting, 5)] == [2, 3, 4, 5, 6]
    await batches.aclose()
    log.close()


async def test_a_fast_stream_reaches_readers_gathered_and_the_end_at_once(tmp_path: Path) -> None:
    """Fifty readers of an engine at thousands of tokens a second must not each wake once a
    token: frames published closer together than flush_s reach a reader as one batch, and the
    terminal frame is handed over at once, after every frame before it."""
    path = tmp_path / "t.events.jsonl"
    log, hub = events.EventLog(path), fanout.Hub(flush_s=0.2)
    hub.publish("t", log.append("queued", {}, ts="t"))
    sub = hub.subscribe("t", path)
    batches = sub.batches()
    assert [f.id for f in await anext(batches)] == [1]
    got: list[list[int]] = []

    async def read() -> None:
        async for batch in batches:
            got.append([f.id for f in batch])

    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0)
    hub.publish("t", log.append("token", {"t": "a", "i": 0}, ts="t"))  # quiet before: next turn
    for _ in range(3):
        await asyncio.sleep(0)
    assert got == [[2]]
    for i in range(1, 40):  # a burst within flush_s: held back, then handed over together
        hub.publish("t", log.append("token", {"t": "b", "i": i}, ts="t"))
        await asyncio.sleep(0)
    assert got == [[2]]
    hub.publish("t", log.append("end", {"tokens_out": 40}, ts="t"))  # the end goes at once
    await asyncio.wait_for(reader, 0.1)
    assert got == [[2], list(range(3, 43))]
    assert hub.count("t") == 0
