"""Is a daemon serving this folder? Asked by `orchctl` (submit, watch, cancel, status) from
`.orch/status.json` and /proc, never from the daemon itself, so it answers at once.

A daemon serves the folder when its status.json exists, says `running`, and names a pid that
is a live process (a zombie is dead: `plugins.liveness`) which started no later than the
daemon says it did: a pid the kernel has since handed to a newer process is not the daemon.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydantic

from plugins import liveness
from state import daemon_lock, statusfile

# A serving daemon writes status.json when what it says changes, and touches it at least this
# often otherwise; a live daemon whose file is older than STALE_S is not passing (stopped by
# a signal, hung on a dead disk).
STATUS_TOUCH_S = 5.0
STALE_S = 30.0

# The daemon stamps started_at once it is built, a little after its process started; a process
# that started this much later than the stamp is another program that got the pid.
PID_REUSE_SLACK_S = 30.0


@dataclass(frozen=True)
class Seen:
    """What status.json says about the daemon, and whether that is still true."""

    path: Path
    status: statusfile.StatusFile | None  # None: no file, or not one this orchctl reads
    problem: str | None  # why `status` is None ("missing" when there is no file)
    written_at: float | None  # status.json's modification time (seconds since the epoch)
    alive: bool  # the daemon's process runs

    @property
    def serving(self) -> bool:
        return self.status is not None and self.status.daemon.state == "running" and self.alive

    @property
    def pid(self) -> int | None:
        return self.status.daemon.pid if self.status is not None else None

    def responding(self, now: float) -> bool:
        """Whether its status was written (or touched) within STALE_S of `now`."""
        return self.written_at is not None and now - self.written_at < STALE_S

    @property
    def stopped_cleanly(self) -> bool:
        return self.status is not None and self.status.daemon.state == "stopped"


def probe(state_dir: Path) -> Seen:
    """What status.json says of the daemon serving `state_dir`. Removed or damaged while a
    daemon holds the folder's lock, it is waited for (the daemon writes it again within
    STATUS_TOUCH_S) rather than taken for no daemon: `submit --wait` would give up on a
    task that runs, and `status` tell the user to start a daemon that cannot start."""
    seen = _probe(state_dir)
    if seen.status is None and daemon_lock.holder_of(state_dir) is not None:
        give_up = time.monotonic() + STATUS_TOUCH_S + 2.0
        while seen.status is None and time.monotonic() < give_up:
            time.sleep(0.1)
            seen = _probe(state_dir)
    return seen


def _probe(state_dir: Path) -> Seen:
    path = state_dir / "status.json"
    try:
        if not path.is_file():  # never open a FIFO or a device the daemon did not write
            missing = not path.exists() and not path.is_symlink()
            return Seen(path, None, "missing" if missing else "is not a file", None, False)
        raw = path.read_bytes()
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return Seen(path, None, "missing", None, False)
    except OSError as exc:
        return Seen(path, None, f"cannot be read: {exc.strerror or exc}", None, False)
    try:
        status = statusfile.StatusFile.model_validate_json(raw)
    except pydantic.ValidationError:
        return Seen(path, None, "is not a status file this orchctl can read", written_at, False)
    alive = process_is(status.daemon.pid, status.daemon.started_at)
    return Seen(path, status, None, written_at, alive)


def process_is(pid: int, started_at: str) -> bool:
    """True when `pid` runs (not a zombie) and started before the daemon's `started_at`."""
    if not liveness.running(pid):
        return False
    started = epoch(started_at)
    proc_start = liveness.start_time(pid)
    boot = _boot_time()
    if started is None or proc_start is None or boot is None:
        return True  # cannot tell a reused pid apart: trust the live process
    return boot + proc_start <= started + PID_REUSE_SLACK_S


def epoch(rfc3339: str) -> float | None:
    """An RFC 3339 time as seconds since the epoch; None when it is not one."""
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _boot_time() -> float | None:
    """The kernel's boot time (btime in /proc/stat), seconds since the epoch."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError):
        return None
    return None
