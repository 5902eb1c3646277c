"""The observed-state snapshot: `.orch/status.json`, written atomically after every pass,
and its table form for `orchctl status`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from state import atomic

if TYPE_CHECKING:
    from reconciler.daemon import Daemon

VERSION = "0.1.0"


def build(daemon: Daemon, *, stopping: bool = False) -> dict[str, Any]:
    config = daemon.config
    snapshot = daemon.pools.last_snapshot
    return {
        "daemon": {
            "pid": os.getpid(),
            "started_at": daemon.started_at,
            "version": VERSION,
            "simulated": daemon.pools.observer.simulated,
            "state": "stopped" if stopping else "running",
        },
        "config": {
            "path": str(config.path),
            "revision": config.revision,
            "applied_at": config.applied_at,
            "errors": [e.as_dict() | {"text": str(e)} for e in config.errors],
        },
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "vram_total_mib": g.vram_total_mib,
                "vram_used_mib": g.vram_used_mib,
                "vram_free_mib": g.vram_free_mib,
                "utilization_pct": g.utilization_pct,
                "temperature_c": g.temperature_c,
                "simulated": g.simulated,
                "processes": [{"pid": p.pid, "used_mib": p.used_mib} for p in g.processes],
                "error": g.error,
            }
            for g in (snapshot.gpus if snapshot else ())
        ],
        "pools": daemon.pools.status(stopping=stopping),
        "queue": daemon.dispatcher.depth(),
    }


def write(path: Path, data: dict[str, Any]) -> None:
    atomic.write_json(path, data, durable=False)


def table(data: dict[str, Any]) -> str:
    """A kubectl-like text view of status.json."""
    lines = []
    d = data.get("daemon", {})
    sim = "  SIMULATED GPUs" if d.get("simulated") else ""
    lines.append(
        f"daemon   pid {d.get('pid')}  {d.get('state', '?')}  since {d.get('started_at')}{sim}"
    )
    c = data.get("config", {})
    lines.append(f"config   {c.get('path')}  revision {c.get('revision')}")
    for err in c.get("errors", []):
        lines.append(f"  ERROR  {err.get('text')}")
    lines.append("")
    lines.append(f"{'GPU':<4}{'NAME':<40}{'USED/TOTAL MiB':>18}{'FREE MiB':>10}")
    for g in data.get("gpus", []):
        lines.append(
            f"{g['index']:<4}{g['name'][:39]:<40}"
            f"{str(g['vram_used_mib']) + '/' + str(g['vram_total_mib']):>18}"
            f"{g['vram_free_mib']:>10}"
        )
    lines.append("")
    lines.append(f"{'POOL':<16}{'MODEL':<20}{'STATE':<15}REASON")
    for p in data.get("pools", []):
        lines.append(f"{p['id']:<16}{p['model']:<20}{p['state']:<15}{p.get('reason') or ''}")
        for r in p.get("replicas", []):
            slots = f"{r.get('slots_busy', 0)}/{r.get('slots_total', 0)}"
            err = f"  last error: {r['last_error']}" if r.get("last_error") else ""
            lines.append(
                f"  {r['id']:<14}{r['state']:<12}gpu {','.join(map(str, r.get('gpu') or []))}"
                f"  pid {r.get('pid')}"
                f"  slots {slots}  restarts {r.get('restarts', 0)}{err}"
            )
    q = data.get("queue", {})
    lines.append("")
    lines.append(
        f"queue    depth {q.get('depth')} ({q.get('by_priority')})  running "
        f"{q.get('running')}  capacity {q.get('capacity')}  policy {q.get('full_policy')}"
    )
    return "\n".join(lines)
