"""`orchctl status`: `.orch/status.json` as a table, and whether it is still true.

The daemon rewrites status.json after every pass and marks it `stopped` when it stops cleanly;
a daemon that was killed leaves one that still says `running`. So the table says which it
is (`probing.probe`): a live daemon's status as it is, a clean stop as "stopped at T", and a
dead pid as NOT RUNNING with the age of the last write, and then GPUs, pools and queue are
labelled as last seen, not live.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from reconciler import cli_common, probing
from reconciler.cli_common import EXIT_FAILED, EXIT_OK, Refused
from state import statusfile


def cmd_status(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    seen = probing.probe(folder.state_dir)
    if seen.status is None:
        shown = folder.shown(seen.path)
        if seen.problem == "missing":
            raise Refused(
                EXIT_FAILED,
                f"no status at {shown}: no daemon has served this folder yet",
                hint=f"start one with: {folder.serve_command()}",
            )
        raise Refused(
            EXIT_FAILED,
            f"{shown} {seen.problem}",
            hint="the daemon writes it afresh as it serves; a running one rewrites it within "
            f"seconds, else start it: {folder.serve_command()}",
        )
    if args.json:
        if not seen.serving:
            cli_common.warn(
                f"warning: daemon pid {seen.status.daemon.pid} is "
                f"{_daemon_state(seen, time.time())}: this status is not live"
            )
        print(seen.status.model_dump_json(indent=2))
        return EXIT_OK
    print(table(seen, now=time.time()))
    return EXIT_OK


def _daemon_state(seen: probing.Seen, now: float) -> str:
    assert seen.status is not None
    d = seen.status.daemon
    if seen.serving:
        if not seen.responding(now):
            age = cli_common.ago(now - seen.written_at) if seen.written_at else "unknown"
            return (
                f"running since {d.started_at}, NOT RESPONDING (status last written {age} "
                f"ago; a serving daemon touches it every {probing.STATUS_TOUCH_S:g} s)"
            )
        if d.stopping_since is not None:
            return (
                f"STOPPING since {d.stopping_since} (running tasks drain; a task delivered "
                "now runs at its next start)"
            )
        return f"running since {d.started_at}"
    if seen.stopped_cleanly:
        return f"stopped at {d.stopped_at or _stamp(seen.written_at)}"
    age = cli_common.ago(now - seen.written_at) if seen.written_at is not None else "unknown"
    return f"NOT RUNNING (last status {age} ago)"


def _stamp(epoch: float | None) -> str:
    if epoch is None:
        return "an unknown time"
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def table(seen: probing.Seen, *, now: float) -> str:
    """A kubectl-like text view of status.json, saying when it is not live."""
    data = seen.status
    assert data is not None
    d = data.daemon
    sim = "  SIMULATED GPUs" if d.simulated else ""
    lines = [f"daemon   pid {d.pid}  {_daemon_state(seen, now)}{sim}"]
    lines += _config(data.config)
    lines.append("")
    if not seen.serving or not seen.responding(now):  # a frozen daemon's tables are as old
        when = d.stopped_at if seen.stopped_cleanly and d.stopped_at else _stamp(seen.written_at)
        lines.append(f"GPUs, pools and queue: last seen at {when}, not live")
    lines += _gpus(data.gpus)
    lines += ["", *_pools(data.pools), "", _queue(data.queue)]
    return "\n".join(lines)


def _config(c: statusfile.ConfigRow) -> list[str]:
    revision = f"  revision {c.revision}" if c.revision else ""
    applied = f"  applied {c.applied_at}" if c.applied_at else "  not applied"
    return [f"config   {c.path}{revision}{applied}", *(f"  ERROR  {e.text}" for e in c.errors)]


def _gpus(gpus: list[statusfile.GpuRow]) -> list[str]:
    lines = [f"{'GPU':<4}{'NAME':<40}{'USED/TOTAL MiB':>18}{'FREE MiB':>10}"]
    for g in gpus:
        used = f"{g.vram_used_mib}/{g.vram_total_mib}"
        error = f"  error: {g.error}" if g.error else ""
        lines.append(f"{g.index:<4}{g.name[:39]:<40}{used:>18}{g.vram_free_mib:>10}{error}")
    return lines


def _pools(pools: list[statusfile.PoolRow]) -> list[str]:
    lines = [f"{'POOL':<16}{'MODEL':<20}{'STATE':<15}REASON"]
    for p in pools:
        lines.append(f"{p.id:<16}{p.model:<20}{p.state:<15}{p.reason or ''}")
        for r in p.replicas:
            err = f"  last error: {r.last_error}" if r.last_error else ""
            pid = f"pid {r.pid}" if r.pid is not None else "no process"
            measured = r.vram_measured_mib if r.vram_measured_mib is not None else "-"
            lines.append(
                f"  {r.id:<14}{r.state:<12}gpu {','.join(map(str, r.gpu))}  {pid}"
                f"  slots {r.slots_busy}/{r.slots_total}"
                f"  vram {r.vram_estimated_mib} est/{measured} used MiB"
                f"  restarts {r.restarts}{err}"
            )
    return lines


def _queue(q: statusfile.QueueRow) -> str:
    by = ", ".join(f"{k} {v}" for k, v in q.by_priority.items()) or "empty"
    return (
        f"queue    depth {q.depth} ({by})  running {q.running}  capacity {q.capacity}"
        f"  policy {q.full_policy}"
    )
