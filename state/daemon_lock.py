"""One daemon per folder: an exclusive lock on `<state>/daemon.lock`, held for the daemon's
life and released by the kernel when its process dies (so a crash never leaves a stale lock),
and one on each folder it shares with its users (the spool, results/), taken on the folder
itself: no file appears among the user's, and none can be deleted from under the lock. Two
configs with their own `state` but one spool would otherwise both claim, recover and run the
same tasks.

The daemon calls `acquire` before it adopts engines or touches the spool; a second daemon on
the same folder gets `Held`, naming the folder and the first one's pid and start time.

The daemon's commit helper holds the locks too (state/committer.py), so that a restart never
recovers the folder while a commit of the last daemon is still renaming files. Killed with
its daemon, it dies a moment later (longer when the kill found it in a sync of a busy disk):
a lock whose daemon is gone is waited for, up to DYING_HOLDER_S, instead of refused at once
with a pid that no longer runs (a service manager restarting a crashed daemon at once).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class Held(Exception):
    """Another live process holds the lock."""

    def __init__(self, path: Path, pid: int | None, since: str | None) -> None:
        who = f"pid {pid}" if pid is not None else "an unknown pid"
        path = Path(os.path.abspath(path))  # `other/../spool` shown as the folder it is
        if path.name == STATE_LOCK:
            what = f"serves this folder since {since or 'an unknown time'} (lock {path})"
        else:  # a spool or results folder named by another config's `paths:`
            what = f"uses {path} (two daemons must not share a spool or results folder)"
        super().__init__(
            f"another daemon ({who}) {what}; stop it first, or give this config its own `paths:`"
        )
        self.pid = pid
        self.since = since


STATE_LOCK = "daemon.lock"
DYING_HOLDER_S = 5.0  # how long a lock whose daemon is gone may take to be let go


def pid_gone(pid: int | None) -> bool:
    """Whether `pid` is known and no longer runs (gone, or a zombie not yet reaped)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def _flock(fd: int, holder: Callable[[], int | None]) -> None:
    """Take the exclusive flock on `fd`; BlockingIOError when another process holds it,
    after waiting up to DYING_HOLDER_S while the daemon it names (`holder()`) is gone."""
    deadline = time.monotonic() + DYING_HOLDER_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline or not pid_gone(holder()):
                raise
        time.sleep(0.01)


@dataclass
class Lock:
    path: Path
    fd: int
    shared: list[int] = field(default_factory=list)  # the shared folders' locks

    def release(self) -> None:
        for fd in self.shared:
            os.close(fd)
        self.shared = []
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def acquire(state_dir: Path, *, started_at: str, shared: Sequence[Path] = ()) -> Lock:
    """Lock `state_dir`, then each folder of `shared` (all or none)."""
    lock = Lock(state_dir / STATE_LOCK, _lock(state_dir / STATE_LOCK, started_at))
    try:
        seen: set[tuple[int, int]] = set()
        for folder in shared:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:  # one folder named twice: locked once (two
                os.close(fd)  # flocks of one process on one folder would refuse each other)
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                _flock(fd, functools.partial(_holder, st))
            except BlockingIOError:
                holder = _holder(st)
                os.close(fd)
                raise Held(folder, holder, None) from None
            except BaseException:
                os.close(fd)
                raise
            lock.shared.append(fd)
    except BaseException:
        lock.release()
        raise
    return lock


def holder_of(state_dir: Path) -> int | None:
    """The pid of the daemon holding `state_dir`'s lock now, None when none holds it (or it
    cannot be told): whether a daemon serves there, whatever its status.json says."""
    try:
        return _holder((state_dir / STATE_LOCK).stat())
    except OSError:
        return None


def _holder(st: os.stat_result) -> int | None:
    """The pid holding a flock on the file or folder `st` describes, from /proc/locks."""
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == inode:
            return int(parts[4]) if parts[4].isdigit() else None
    return None


def _lock(path: Path, started_at: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    try:
        _flock(fd, lambda: _pid_in(_read(fd)))
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
    return fd


def recorded_pid(path: Path) -> int | None:
    """The pid the lock file at `path` names (the daemon that last held it: it may have
    stopped since), None when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        return _pid_in(_read(fd))
    finally:
        os.close(fd)


def _pid_in(holder: dict[str, object]) -> int | None:
    """The pid a lock file's contents name, None when they name none."""
    pid = holder.get("pid")
    return pid if isinstance(pid, int) and not isinstance(pid, bool) else None


def _read(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
