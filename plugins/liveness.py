"""Is a process still running, and is it the one we knew? Read from /proc/<pid>/stat.

The one place that answers these questions, so every caller agrees on what "dead" means:
`plugins.processes` (stopping and adopting engine children, and through it the daemon),
`plugins.engine_sim` (forgetting the VRAM bookings of a gone child), and the simulated GPU's
bookings (`plugins.sim_bookings`), which both the observer (`plugins.gpu_simulated`) and the
sim child (`plugins.sim_server`) count only while their process lives.

Rules it keeps:
- A zombie (state Z: exited, not yet reaped by its parent) or a dying task (X) is dead: it runs
  nothing and holds no GPU memory, whatever `kill(pid, 0)` says.
- A pid names a process only together with its start time (field 22 of the stat line, in clock
  ticks since boot): `pid_alive` checks both, so a reused pid is never taken for ours.
- A pid we cannot read (no such process, or /proc hides it) is dead.

Standard library only: the sim child imports it and runs without site-packages (`python -S`).
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_DEAD_STATES = ("Z", "X")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in ticks) of a process, or None when there is no such pid."""
    if pid <= 0:  # /proc/0 does not exist; /proc/-1 would be a path error, not a process
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = data[data.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
    return fields[0], int(fields[19])  # fields 3 and 22


def start_time(pid: int) -> float | None:
    """The process's start time in seconds since boot, or None when there is no such pid.
    A zombie still has one: use `running` or `pid_alive` to ask whether it lives."""
    stat = _stat(pid)
    return None if stat is None else stat[1] / _TICKS


def running(pid: int) -> bool:
    """True when some process with this pid runs (not a zombie), whoever started it."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in _DEAD_STATES


def pid_alive(pid: int, started_at: float | None) -> bool:
    """True when `pid` runs and is the process that started at `started_at` (not a zombie).
    An unknown start time proves nothing: False."""
    if started_at is None:
        return False
    stat = _stat(pid)
    if stat is None or stat[0] in _DEAD_STATES:
        return False
    return stat[1] == round(started_at * _TICKS)
