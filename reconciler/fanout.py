"""Event fan-out: each task's frames are appended to its log, then offered to subscribers.

The log on disk is the source of truth; a subscriber's in-memory queue is only a fast path.
A subscriber that falls behind (its bounded queue is full) is marked lagging and catches up
from the log, so a slow reader never slows the engine or other readers and never loses a
`token` frame. The SSE endpoint and `orchctl watch` are subscribers.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncGenerator
from pathlib import Path

from state import events

QUEUE_FRAMES = 256
BATCH_FRAMES = 256  # at most this many frames in one write


class Subscription:
    def __init__(self, hub: Hub, task_id: str, log_path: Path, after: int) -> None:
        self.hub = hub
        self.task_id = task_id
        self.log_path = log_path
        self.after = after
        self.queue: asyncio.Queue[events.EventFrame] = asyncio.Queue(QUEUE_FRAMES)
        self.lagging = False

    def offer(self, frame: events.EventFrame) -> None:
        if self.lagging:
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.lagging = True

    async def batches(self) -> AsyncGenerator[list[events.EventFrame], None]:
        """The frames of `frames`, in order, grouped: each live frame with those already
        queued behind it, so a busy stream is written in a few large writes rather than one
        per token (fifty clients of a fast engine would otherwise cost fifty writes a
        token)."""
        try:
            while True:
                self.lagging = False  # cleared before the read, as in `frames`
                backlog: list[events.EventFrame] = []
                for frame in events.read(self.log_path, after=self.after):
                    self.after = frame.id
                    backlog.append(frame)
                    if frame.terminal or len(backlog) >= BATCH_FRAMES:
                        yield backlog
                        if frame.terminal:
                            return
                        backlog = []
                if backlog:
                    yield backlog
                gap = False
                while not self.lagging and not gap:
                    frame = await self.queue.get()
                    batch: list[events.EventFrame] = []
                    while True:
                        if frame.id == self.after + 1:
                            self.after = frame.id
                            batch.append(frame)
                            if frame.terminal:
                                yield batch
                                return
                        elif frame.id > self.after:
                            gap = True  # catch up from the log
                            break
                        if self.queue.empty() or len(batch) >= BATCH_FRAMES:
                            break
                        frame = self.queue.get_nowait()
                    if batch:
                        yield batch
        finally:
            self.hub.unsubscribe(self)

    async def frames(self) -> AsyncGenerator[events.EventFrame, None]:
        """Replay from the log after `after`, then live frames, until the terminal frame."""
        try:
            while True:
                # Clear the flag before reading the log: a frame appended during the read is
                # then queued (and skipped by id if the read already saw it), never lost.
                self.lagging = False
                for frame in events.read(self.log_path, after=self.after):
                    self.after = frame.id
                    yield frame
                    if frame.terminal:
                        return
                while not self.lagging:
                    frame = await self.queue.get()
                    if frame.id <= self.after:
                        continue
                    if frame.id != self.after + 1:  # a gap: catch up from the log
                        break
                    self.after = frame.id
                    yield frame
                    if frame.terminal:
                        return
        finally:
            self.hub.unsubscribe(self)


class Hub:
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)

    def subscribe(self, task_id: str, log_path: Path, *, after: int = 0) -> Subscription:
        sub = Subscription(self, task_id, log_path, after)
        self._subs[task_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[sub.task_id]

    def publish(self, task_id: str, frame: events.EventFrame) -> None:
        for sub in list(self._subs.get(task_id, ())):
            sub.offer(frame)

    def count(self, task_id: str) -> int:
        return len(self._subs.get(task_id, ()))
