"""File watching: watchdog events on orch.yaml (seen from its folder, so that a file renamed
onto it counts; nothing else there does: the daemon's own log may be written beside it), and
arrivals in spool/incoming and spool/cancel, only wake the loop (level-triggered: the pass
re-reads everything, so a lost event costs at most one resync). The daemon calls `start` once
and stops the returned observer on exit. A file renamed into place is also noted in `renamed`
(path → wall-clock time), so the config can tell an atomic save, whole at once, from a file
still being written."""

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
        self,
        loop: asyncio.AbstractEventLoop,
        event: asyncio.Event,
        renamed: dict[str, float] | None,
        only: frozenset[str] | None = None,
        written: tuple[str, dict[str, float]] | None = None,
    ) -> None:
        self.loop = loop
        self.event = event
        self.renamed = renamed
        self.only = only  # the paths whose events count (None: all in the folders watched)
        # (folder, name -> monotonic time): files closed after writing in that folder, i.e.
        # written in place there, not renamed or linked in whole
        self.written = written

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Reading a file is not a change: without this, the pass that reads orch.yaml would
        # wake the next pass, and the loop would spin on its own reads.
        if event.event_type in _NOT_CHANGES:
            return
        if self.only is not None and not (
            os.fsdecode(event.src_path) in self.only
            or os.fsdecode(getattr(event, "dest_path", "") or "") in self.only
        ):
            # another file beside orch.yaml: the daemon's own log (`serve > serve.log` in
            # the config's folder) would wake a pass per line, and a line a pass logs then
            # a pass per line, back to back
            return
        if event.event_type == "moved" and self.renamed is not None:
            self.renamed[os.fsdecode(event.dest_path)] = time.time()
        if event.event_type == "closed" and self.written is not None:
            folder, name = os.path.split(os.fsdecode(event.src_path))
            if os.path.abspath(folder) == self.written[0]:
                self.written[1][name] = time.monotonic()
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
    files: Iterable[Path],
    renamed: dict[str, float] | None = None,
    *,
    drops: Iterable[Path] = (),
    written: tuple[Path, dict[str, float]] | None = None,
) -> Any:
    """A started watchdog observer that sets `event` on any change (CHANGES) of one of `files`
    (a file renamed onto one included), and on an arrival (ARRIVALS) in `drops`, and notes
    renames in `renamed`, and in `written` (a folder of `drops`, a map) the files closed
    after writing there, by name, with the monotonic time."""
    observer = Observer()
    renamed = {} if renamed is None else renamed
    # the drop folders' renames are not noted: nothing reads them, and every task file
    # renamed into incoming/ would stay in the map for the daemon's life (it grew by one
    # entry per task)
    waker = _Waker(
        loop,
        event,
        None,
        written=(os.path.abspath(written[0]), written[1]) if written is not None else None,
    )
    files = [Path(os.path.abspath(f)) for f in files]
    only = _Waker(loop, event, renamed, only=frozenset(str(f) for f in files))
    for folder in {f.parent for f in files}:
        observer.schedule(only, str(folder), recursive=False, event_filter=CHANGES)
    for folder in drops:
        observer.schedule(waker, str(folder), recursive=False, event_filter=ARRIVALS)
    observer.daemon = True
    observer.start()
    return observer
