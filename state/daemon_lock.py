"""One daemon per folder: an exclusive lock on `<state>/daemon.lock`, held for the daemon's
life and released by the kernel when its process dies (so a crash never leaves a stale lock).

The daemon calls `acquire` before it adopts engines or touches the spool; a second daemon on
the same folder gets `Held`, naming the first one's pid and start time from the file.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path


class Held(Exception):
    """Another live process holds the lock."""

    def __init__(self, path: Path, pid: int | None, since: str | None) -> None:
        who = f"pid {pid}" if pid is not None else "an unknown pid"
        super().__init__(
            f"another daemon ({who}) serves this folder since {since or 'an unknown time'} "
            f"(lock {path}); stop it first, or give this config other `paths:`"
        )
        self.pid = pid
        self.since = since


@dataclass
class Lock:
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def acquire(state_dir: Path, *, started_at: str) -> Lock:
    path = state_dir / "daemon.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        pid, since = holder.get("pid"), holder.get("started_at")
        pid = pid if isinstance(pid, int) else None
        raise Held(path, pid, str(since) if since else None) from None
    except BaseException:
        os.close(fd)
        raise
    # the lock is ours: say who holds it, for the next daemon's message
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "started_at": started_at}).encode(), 0)
    return Lock(path, fd)


def _read(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
