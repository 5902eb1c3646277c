"""The table form of `.orch/status.json` for `orchctl status`. The file's shape is
`state.statusfile.StatusFile`, which the daemon assembles and writes."""

from __future__ import annotations

from importlib import metadata

from state import statusfile


def version() -> str:
    """This package's version, from its installed metadata (pyproject.toml)."""
    try:
        return metadata.version("llama-orch-home")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def table(data: statusfile.StatusFile) -> str:
    """A kubectl-like text view of status.json."""
    d = data.daemon
    sim = "  SIMULATED GPUs" if d.simulated else ""
    lines = [f"daemon   pid {d.pid}  {d.state}  since {d.started_at}{sim}"]
    c = data.config
    lines.append(f"config   {c.path}  revision {c.revision}")
    lines += [f"  ERROR  {err.text}" for err in c.errors]
    lines += ["", f"{'GPU':<4}{'NAME':<40}{'USED/TOTAL MiB':>18}{'FREE MiB':>10}"]
    for g in data.gpus:
        used = f"{g.vram_used_mib}/{g.vram_total_mib}"
        lines.append(f"{g.index:<4}{g.name[:39]:<40}{used:>18}{g.vram_free_mib:>10}")
    lines += ["", f"{'POOL':<16}{'MODEL':<20}{'STATE':<15}REASON"]
    for p in data.pools:
        lines.append(f"{p.id:<16}{p.model:<20}{p.state:<15}{p.reason or ''}")
        for r in p.replicas:
            err = f"  last error: {r.last_error}" if r.last_error else ""
            pid = f"pid {r.pid}" if r.pid is not None else "no process"
            lines.append(
                f"  {r.id:<14}{r.state:<12}gpu {','.join(map(str, r.gpu))}  {pid}"
                f"  slots {r.slots_busy}/{r.slots_total}  restarts {r.restarts}{err}"
            )
    q = data.queue
    by = ", ".join(f"{k} {v}" for k, v in q.by_priority.items()) or "empty"
    lines += [
        "",
        f"queue    depth {q.depth} ({by})  running {q.running}  capacity {q.capacity}"
        f"  policy {q.full_policy}",
    ]
    return "\n".join(lines)
