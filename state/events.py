"""Per-task event logs (results/<task_id>.events.jsonl): the source of SSE replay.

One JSON object per line: `{"id", "event", "data", "ts"}`, ids strictly increasing from 1.
Frames are written through to the OS at once (so tailing readers see them) and fsynced at the
terminal frame; only a new log's first frames, in a group commit of the daemon's loop, and the
frames a task holds back until its start is durable are left to the commit thread
(`atomic.append`), which writes them just before the result they precede.
A log reopened after a crash continues after its last complete line: an id is never reused,
and a torn last line (a crash mid-write) is cut off before appending.
"""

from __future__ import annotations

import collections
import json
import os
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from state import atomic

EventName = Literal["queued", "started", "token", "metrics", "end", "error"]
TERMINAL_EVENTS = frozenset({"end", "error"})


class EventFrame(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1)
    event: EventName
    data: dict[str, Any]
    ts: str

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


_STREAMING = frozenset({"started", "token", "metrics"})
# one encoder for every frame: json.dumps with an option builds a new one at each call
_encode = json.JSONEncoder(ensure_ascii=False).encode


class EventLog:
    """Appends frames to one task's log. Not thread-safe: one writer per task."""

    def __init__(self, path: Path, *, new: bool = False, after: int = 0) -> None:
        """`new`: the caller knows there is no log at `path` yet (none is read); its frames
        are numbered from `after` + 1 (a task that took over the id of an earlier one goes on
        after that one's ids, so a reader resuming with Last-Event-ID never takes the new
        task's frames for the rest of the old one's)."""
        self.path = path
        self.last_id, self.terminal = (after, False) if new else _recover(path)
        self._first = self.last_id if new else 0  # `last_id` while the file is still to make
        self._fd: int | None = None  # opened while frames stream; closed (also if dropped)
        self._size = 0  # the file's size while `_fd` is open (this is its only writer)
        self._closer: Any = None  # a weakref.finalize: closes the fd once, also on GC

    def append(self, event: EventName, data: dict[str, Any], *, ts: str) -> EventFrame:
        """Write one frame as one line (a single write, unbuffered, so readers never see
        half of it); the terminal frame is fsynced. The file stays open only while frames
        stream (`started` to the end), so a deep queue holds no descriptors."""
        return self.extend(event, [data], ts=ts)[0]

    def extend(
        self, event: EventName, items: list[dict[str, Any]], *, ts: str, held: bool = False
    ) -> list[EventFrame]:
        """Frames of one kind that arrived together (an engine's tokens in one read), written
        in a single write; a terminal frame only on its own. `held`: left to the pending
        group commit, which appends them before the writes that follow (a task whose engine
        ended before its running result was durable: nothing of it shows before that)."""
        if self.terminal:
            raise RuntimeError(f"{self.path.name}: nothing may follow a terminal frame")
        if not items:
            return []
        terminal = event in TERMINAL_EVENTS
        if terminal and len(items) != 1:
            raise ValueError("a terminal frame is written on its own")
        first = self.last_id + 1
        lines = [
            _encode({"id": first + n, "event": event, "data": data, "ts": ts})
            for n, data in enumerate(items)
        ]
        data = ("\n".join(lines) + "\n").encode()
        # a new log's first frames (a task queued) are written by the group commit's thread,
        # before the result that follows them: creating a file can take a millisecond
        if held:
            self.close()  # the commit thread appends by name: the next open reads the size
        left_to_commit = self._fd is None and atomic.append(
            self.path, data, new=self.last_id == self._first, held=held
        )
        if not left_to_commit:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                self._closer = weakref.finalize(self, os.close, self._fd)
                self._size = os.fstat(self._fd).st_size
            deferred = terminal and atomic.deferring()
            try:
                atomic.append_whole(
                    self.path, data, fd=self._fd, size=self._size, sync=terminal and not deferred
                )
            except BaseException:
                self.close()  # the next frame opens it again and reads its size afresh
                raise
            self._size += len(data)
            if deferred:  # the group's commit syncs it, before the terminal result appears
                atomic.written(self.path)
        if event not in _STREAMING:
            self.close()
        self.last_id, self.terminal = first + len(items) - 1, terminal
        # the data came from the loop itself: no validation needed on the hot path
        return [
            EventFrame.model_construct(id=first + n, event=event, data=data, ts=ts)
            for n, data in enumerate(items)
        ]

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd, self._closer = None, None


def read(path: Path, *, after: int = 0, damaged: list[int] | None = None) -> Iterator[EventFrame]:
    """Frames with id > `after`, in order; a torn last line is ignored, and so is a line
    that is not a frame (changed by hand): its number goes in `damaged`, for the reader to
    say so, and the frames around it are read as they are."""
    try:
        with path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    return
                try:
                    frame = EventFrame.model_validate_json(raw)
                except ValueError:  # pydantic's ValidationError is one
                    if damaged is not None and raw.strip():
                        damaged.append(number)
                    continue
                if frame.id > after:
                    yield frame
    except FileNotFoundError:
        return


def last(path: Path) -> EventFrame | None:
    """The last frame of the log (None when it has none), read as `read` reads it."""
    kept = collections.deque(read(path), maxlen=1)  # reads it through, keeps the last
    return kept[0] if kept else None


def read_dicts(path: Path) -> list[dict[str, Any]]:
    """Every complete frame as the JSON object written (a torn last line is ignored): for
    copying a log whole, without validating frames this module wrote itself."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(raw) for raw in data[: data.rfind(b"\n") + 1].splitlines() if raw.strip()]


def last_id(raw: bytes) -> int:
    """The highest frame id among the complete lines of a log's bytes (0: none)."""
    return _scan(raw[: raw.rfind(b"\n") + 1])[0]


def _recover(path: Path) -> tuple[int, bool]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, False
    cut = data.rfind(b"\n") + 1
    if cut < len(data):  # torn tail from a crash mid-write: drop it so ids stay contiguous
        with path.open("r+b") as fh:
            fh.truncate(cut)
    return _scan(data[:cut])


def _scan(data: bytes) -> tuple[int, bool]:
    """The highest frame id of whole lines `data`, and whether the last frame is terminal."""
    highest, terminal = 0, False
    for raw in data.splitlines():
        if raw.strip():
            try:
                frame = EventFrame.model_validate_json(raw)
            except ValueError:  # a line changed by hand is no frame: the ids go on after
                continue  # the last real one
            highest, terminal = max(highest, frame.id), frame.terminal
    return highest, terminal
