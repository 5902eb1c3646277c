"""File watching: watchdog events on orch.yaml's folder, and arrivals in spool/incoming and
spool/cancel, only wake the loop (level-triggered: the pass re-reads everything, so a lost
event costs at most one resync). The daemon calls `start` once and stops the returned
observer on exit. A file renamed into place is also noted in `renamed` (path → wall-clock
time), so the config can tell an atomic save, whole at once, from a file still being
written."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

_NOT_CHANGES = frozenset({"opened", "closed_no_write"})


class _Waker(FileSystemEventHandler):
    def __init__(
        self, loop: asyncio.AbstractEventLoop, event: asyncio.Event, renamed: dict[str, float]
    ) -> None:
        self.loop = loop
        self.event = event
        self.renamed = renamed

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reading a file is not a change: without this, the pass that reads orch.yaml would
        # wake the next pass, and the loop would spin on its own reads.
        if event.event_type in _NOT_CHANGES:
            return
        if event.event_type == "moved":
            self.renamed[os.fsdecode(event.dest_path)] = time.time()
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.event.set)


# What arrives in a drop folder (spool/incoming, spool/cancel): a file created or closed after
# writing, or renamed in. Not what the daemon's own claims do there (a link, which changes the
# file's attributes, then an unlink): with those in the inotify mask, every claimed file cost
# the watcher threads three events to process while the loop was busy admitting the burst.
ARRIVALS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirMovedEvent,
]


# orch.yaml's folder: every change but a read (the daemon's own reads of orch.yaml, each pass,
# would otherwise be two events each; the waker ignores them anyway)
CHANGES: list[type[FileSystemEvent]] = [
    *ARRIVALS,
    FileModifiedEvent,
    FileDeletedEvent,
    DirModifiedEvent,
    DirDeletedEvent,
]


def start(
    loop: asyncio.AbstractEventLoop,
    event: asyncio.Event,
    folders: Iterable[Path],
    renamed: dict[str, float] | None = None,
    *,
    drops: Iterable[Path] = (),
) -> Any:
    """A started watchdog observer that sets `event` on any change (CHANGES) in `folders`, and
    on an arrival (ARRIVALS) in `drops`, and notes renames in `renamed`."""
    observer = Observer()
    waker = _Waker(loop, event, {} if renamed is None else renamed)
    for folder in folders:
        observer.schedule(waker, str(folder), recursive=False, event_filter=CHANGES)
    for folder in drops:
        observer.schedule(waker, str(folder), recursive=False, event_filter=ARRIVALS)
    observer.daemon = True
    observer.start()
    return observer
