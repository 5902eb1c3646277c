"""Task files still waiting in the spool (incoming/ and active/), and the task ids they claim.

`orchctl` calls `find` before it cancels, watches or submits a task, and `waiting` to list
tasks: a task id is known to a folder when results/<id>.json exists or a file for it waits
here. A waiting file's id is its `task_id:` field, else its file name's stem, as intake
decides (`reconciler.intake.claimed_task_id`). Files are read as defensively as intake reads
them (no links, no FIFOs, at most 1 MiB, no YAML aliases, via `state.loading`); a file that
cannot be read or parsed counts under its stem, and nothing here raises on a hostile spool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from state import ids, loading, spool, tasks

Folder = Literal["incoming", "active"]


@dataclass(frozen=True)
class Pending:
    """One file waiting in spool/incoming/ (not yet claimed) or spool/active/ (claimed)."""

    task_id: str | None  # None when neither the file nor its name gives a safe id
    folder: Folder
    name: str
    mtime: float  # seconds since the epoch; 0.0 when the file vanished while listed


def waiting(the_spool: spool.Spool) -> list[Pending]:
    """Every file in incoming/ and active/, oldest first within each folder."""
    listings: tuple[tuple[Folder, Path, list[str]], ...] = (
        ("incoming", the_spool.incoming, spool.incoming_names(the_spool)),
        ("active", the_spool.active, spool.active_names(the_spool)),
    )
    return [
        Pending(task_id_of(base / name), folder, name, _mtime(base / name))
        for folder, base, names in listings
        for name in names
    ]


def find(the_spool: spool.Spool, task_id: str) -> Pending | None:
    """The first waiting file that claims `task_id`, or None."""
    return next((p for p in waiting(the_spool) if p.task_id == task_id), None)


def task_id_of(path: Path) -> str | None:
    """The id the daemon will give this file: its `task_id:` when that is a safe id string,
    else the file name's stem when that is safe, else None (also for a name intake refuses
    whatever it holds: one not ending in .task.yaml, .task.yml or .task.json never runs)."""
    if not path.name.endswith(tasks.TASK_SUFFIXES):
        return None
    stem = tasks.stem(path.name)
    fallback = stem if ids.is_safe_id(stem) else None
    text, problems = loading.read_text(path)
    if text is None or problems or "task_id" not in text:  # the common case needs no parse
        return fallback
    data, _, problems = loading.parse_document(text, path.name)
    candidate = data.get("task_id") if isinstance(data, dict) and not problems else None
    if isinstance(candidate, str):  # a named id that is unsafe claims nothing, as in intake
        return candidate if ids.is_safe_id(candidate) else None
    return fallback


def _mtime(path: Path) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0
