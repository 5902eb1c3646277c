"""Event fan-out: each task's frames are appended to its log, then offered to subscribers.

The log on disk is the source of truth; a subscriber's in-memory deque is only a fast path.
A subscriber that falls behind (its bounded deque is full) is marked lagging and catches up
from the log, so a slow reader never slows the engine or other readers and never loses a
`token` frame. The SSE endpoint and `orchctl watch` are subscribers.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from pathlib import Path

from state import events

QUEUE_FRAMES = 1024  # live frames a reader may fall behind before it reads the log instead
BATCH_FRAMES = 256  # at most this many frames in one write


class Subscription:
    """One reader of one task's frames: the log first, then live frames from the hub.

    Live frames wait in a bounded deque; the reader is woken once per event-loop turn
    however many frames arrived (an Event, not a queue: fifty readers of a fast engine would
    otherwise be woken fifty times a token). A reader that falls QUEUE_FRAMES behind is marked
    lagging, its deque dropped, and it catches up from the log.
    """

    def __init__(self, hub: Hub, task_id: str, log_path: Path, after: int) -> None:
        self.hub = hub
        self.task_id = task_id
        self.log_path = log_path
        self.after = after
        self.pending: deque[events.EventFrame] = deque()
        self.ready = asyncio.Event()
        self.lagging = False

    def offer(self, frame: events.EventFrame) -> None:
        if self.lagging:
            return
        if len(self.pending) >= QUEUE_FRAMES:
            self.lagging = True
            self.pending.clear()  # the log has every one of them
        else:
            self.pending.append(frame)
        self.ready.set()

    async def batches(self) -> AsyncGenerator[list[events.EventFrame], None]:
        """The frames after `after`, in order, in groups of at most BATCH_FRAMES, until the
        terminal frame: from the log, then live, back to the log after a lag or a gap."""
        try:
            while True:
                self.lagging = False
                backlog: list[events.EventFrame] = []
                for frame in events.read(self.log_path, after=self.after):
                    if frame.id <= self.after:
                        continue
                    self.after = frame.id
                    backlog.append(frame)
                    if frame.terminal or len(backlog) >= BATCH_FRAMES:
                        yield backlog
                        if frame.terminal:
                            return
                        backlog = []
                if backlog:
                    yield backlog
                while True:
                    if not self.pending and not self.lagging:
                        self.ready.clear()
                        await self.ready.wait()
                    if self.lagging:
                        break  # catch up from the log
                    batch: list[events.EventFrame] = []
                    gap = False
                    while self.pending and len(batch) < BATCH_FRAMES:
                        frame = self.pending.popleft()
                        if frame.id <= self.after:
                            continue  # already read from the log
                        if frame.id != self.after + 1:
                            gap = True
                            break
                        self.after = frame.id
                        batch.append(frame)
                        if frame.terminal:
                            yield batch
                            return
                    if batch:
                        yield batch
                    if gap:
                        self.pending.clear()
                        break
        finally:
            self.hub.unsubscribe(self)

    async def frames(self) -> AsyncGenerator[events.EventFrame, None]:
        """The same frames one at a time."""
        batches = self.batches()
        try:
            async for batch in batches:
                for frame in batch:
                    yield frame
        finally:
            await batches.aclose()


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
