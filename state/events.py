"""Per-task event logs (results/<task_id>.events.jsonl): the source of SSE replay.

One JSON object per line: `{"id", "event", "data", "ts"}`, ids strictly increasing from 1.
Frames are written through to the OS at once (so tailing readers see them) and fsynced at the
terminal frame. A log reopened after a crash continues after its last complete line: an id is
never reused, and a torn last line (a crash mid-write) is cut off before appending.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class EventLog:
    """Appends frames to one task's log. Not thread-safe: one writer per task."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_id, self.terminal = _recover(path)

    def append(self, event: EventName, data: dict[str, Any], *, ts: str) -> EventFrame:
        if self.terminal:
            raise RuntimeError(f"{self.path.name}: nothing may follow a terminal frame")
        frame = EventFrame(id=self.last_id + 1, event=event, data=data, ts=ts)
        line = (json.dumps(frame.model_dump(mode="json"), ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
            if frame.terminal:
                os.fsync(fd)
        finally:
            os.close(fd)
        self.last_id = frame.id
        self.terminal = frame.terminal
        return frame


def read(path: Path, *, after: int = 0) -> Iterator[EventFrame]:
    """Frames with id > `after`, in order; a torn last line is ignored."""
    try:
        with path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    return
                frame = EventFrame.model_validate_json(raw)
                if frame.id > after:
                    yield frame
    except FileNotFoundError:
        return


def _recover(path: Path) -> tuple[int, bool]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, False
    cut = data.rfind(b"\n") + 1
    if cut < len(data):  # torn tail from a crash mid-write: drop it so ids stay contiguous
        with path.open("r+b") as fh:
            fh.truncate(cut)
    last_id, terminal = 0, False
    for raw in data[:cut].splitlines():
        if raw.strip():
            frame = EventFrame.model_validate_json(raw)
            last_id, terminal = frame.id, frame.terminal
    return last_id, terminal
