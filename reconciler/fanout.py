"""Event fan-out: each task's frames are appended to its log, then offered to subscribers.

The log on disk is the source of truth; a subscriber's in-memory deque is only a fast path.
A subscriber that falls behind (its bounded deque is full) is marked lagging and catches up
from the log, so a slow reader never slows the engine or other readers and never loses a
`token` frame. The SSE endpoint and `orchctl watch` are subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict, deque
from collections.abc import AsyncGenerator
from pathlib import Path

from reconciler import logs
from state import events

log = logs.get("http")

QUEUE_FRAMES = 1024  # live frames a reader may fall behind before it reads the log instead
BATCH_FRAMES = 256  # at most this many frames in one write
FLUSH_S = 0.01  # a fast stream's frames reach its readers at most this often, gathered


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

    said_damaged = False  # its log's lines that are no frames were logged

    def offer(self, frames: list[events.EventFrame]) -> None:
        if self.lagging:
            return
        if len(self.pending) + len(frames) > QUEUE_FRAMES:
            self.lagging = True
            self.pending.clear()  # the log has every one of them
        else:
            self.pending.extend(frames)
        self.ready.set()

    async def batches(
        self, *, wait_s: float | None = None
    ) -> AsyncGenerator[list[events.EventFrame], None]:
        """The frames after `after`, in order, in groups of at most BATCH_FRAMES, until the
        terminal frame: from the log, then live, back to the log after a lag or a gap. A
        reader that resumes at or past the terminal frame's id gets none, and the end.
        With `wait_s`: an empty group after each `wait_s` without a frame (the reader may
        look whether its client is still there)."""
        try:
            while True:
                self.lagging = False
                backlog: list[events.EventFrame] = []
                damaged: list[int] = []
                for frame in events.read(self.log_path, damaged=damaged):
                    if frame.id <= self.after:
                        if frame.terminal:  # the reader has had the end (or resumes past it)
                            return
                        continue
                    self.after = frame.id
                    backlog.append(frame)
                    if frame.terminal or len(backlog) >= BATCH_FRAMES:
                        yield backlog
                        if frame.terminal:
                            return
                        backlog = []
                if damaged and not self.said_damaged:
                    self.said_damaged = True
                    say_damaged(self.log_path, damaged)
                if backlog:
                    yield backlog
                while True:
                    if not self.pending and not self.lagging:
                        self.ready.clear()
                        try:
                            await asyncio.wait_for(self.ready.wait(), wait_s)
                        except TimeoutError:
                            yield []
                            continue
                    if self.lagging:
                        break  # catch up from the log
                    batch: list[events.EventFrame] = []
                    gap = False
                    while self.pending and len(batch) < BATCH_FRAMES:
                        frame = self.pending.popleft()
                        if frame.id <= self.after:
                            if frame.terminal:  # a reader that resumed past the end
                                return
                            continue  # already read from the log
                        if frame.id != self.after + 1:
                            gap = True
                            break
                        self.after = frame.id
                        batch.append(frame)
                        if frame.terminal:
                            yield batch
                            return
                    if batch or wait_s is not None:  # (frames the reader had: a look too)
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
    """Subscriptions by task, and the frames on their way to them.

    A frame is published once the log has it. Readers of a quiet stream get it on the next
    event-loop turn; a fast stream's frames are gathered and handed over at most every
    FLUSH_S (a terminal frame at once), so fifty readers of an engine at thousands of tokens
    a second each wake and write a hundred times a second, not once a token. Without a
    running loop (a test driving the books directly) frames are handed over at once.
    """

    def __init__(self, flush_s: float = FLUSH_S) -> None:
        self.flush_s = flush_s
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._outbox: dict[str, list[events.EventFrame]] = {}
        self._last_flush: dict[str, float] = {}

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
                self._last_flush.pop(sub.task_id, None)

    def publish(self, task_id: str, *frames: events.EventFrame) -> None:
        """Frames the log has just written, in order."""
        if task_id not in self._subs or not frames:
            return  # nobody reads it live; a later reader starts from the log
        terminal = frames[-1].terminal
        outbox = self._outbox.get(task_id)
        if outbox is not None:  # a hand-over is already due
            outbox.extend(frames)
            if terminal:
                self._flush(task_id)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._offer(task_id, list(frames))
            return
        if terminal:
            self._offer(task_id, list(frames))
            return
        self._outbox[task_id] = list(frames)
        wait = self._last_flush.get(task_id, 0.0) + self.flush_s - loop.time()
        if wait > 0:
            loop.call_later(wait, self._flush, task_id)
        else:
            loop.call_soon(self._flush, task_id)

    def _flush(self, task_id: str) -> None:
        frames = self._outbox.pop(task_id, None)
        if frames:
            self._offer(task_id, frames)

    def _offer(self, task_id: str, frames: list[events.EventFrame]) -> None:
        subs = self._subs.get(task_id)
        if not subs:
            return
        with contextlib.suppress(RuntimeError):
            self._last_flush[task_id] = asyncio.get_running_loop().time()
        for sub in list(subs):
            sub.offer(frames)

    def count(self, task_id: str) -> int:
        return len(self._subs.get(task_id, ()))


def say_damaged(path: Path, lines: list[int]) -> None:
    """Log that lines of an event log are no frames (changed by hand): they are left out of
    what is read from it, and the frames around them are served."""
    shown = ", ".join(map(str, lines[:10])) + (
        f" and {len(lines) - 10} more" if len(lines) > 10 else ""
    )
    logs.emit(
        log,
        "events.damaged",
        f"results/{path.name}: line {shown} is not an event frame (changed outside the "
        "daemon?); it is left out of the task's stream. Put the right file back, or remove "
        "the line.",
        level=30,
        path=str(path),
    )
