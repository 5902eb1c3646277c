"""File watching: watchdog events on orch.yaml's folder, spool/incoming and spool/cancel only
wake the loop (level-triggered: the pass re-reads everything, so a lost event costs at most
one resync). The daemon calls `start` once and stops the returned observer on exit. A file
renamed into place is also noted in `renamed` (path → wall-clock time), so the config can
tell an atomic save, whole at once, from a file still being written."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
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


def start(
    loop: asyncio.AbstractEventLoop,
    event: asyncio.Event,
    folders: Iterable[Path],
    renamed: dict[str, float] | None = None,
) -> Any:
    """A started watchdog observer that sets `event` on any change in `folders` and notes
    renames in `renamed`."""
    observer = Observer()
    waker = _Waker(loop, event, {} if renamed is None else renamed)
    for folder in folders:
        observer.schedule(waker, str(folder), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
