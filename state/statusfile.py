"""`.orch/status.json`: the observed state a user (and `orchctl status`) reads.

The daemon assembles a `StatusFile` after every pass from rows the pool runtime
(`PoolRow`, `ReplicaRow`) and the dispatcher (`QueueRow`) return, and writes it atomically;
`reconciler/cli_status.py` renders it as a table. The JSON Schema in
`schemas/status.schema.json` is generated from these models. `ReplicaState` is the one list
of replica states the whole loop uses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from state import loading, observed

ReplicaState = Literal["Starting", "Ready", "Draining", "BackingOff", "Failed", "Stopped"]
PoolState = Literal["Ready", "Progressing", "Unschedulable", "Failed", "Stopped"]
DaemonState = Literal["running", "stopped"]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DaemonRow(_Row):
    pid: int
    started_at: str
    version: str
    simulated: bool
    state: DaemonState
    stopped_at: str | None = Field(None, description="when the daemon stopped cleanly")
    stopping_since: str | None = Field(
        None,
        description="while the daemon stops: since when (its running tasks drain, no new task "
        "starts: a task delivered now runs at its next start)",
    )
    url: str | None = Field(None, description="the HTTP API's address while it serves")
    paths: dict[str, str] | None = Field(
        None,
        description="the folders it serves, absolute: spool, results, state (taken at its "
        "start: an edit of orch.yaml's paths waits for a restart)",
    )


class ConfigErrorRow(_Row):
    path: str
    line: int | None
    column: int | None
    field: str | None
    message: str
    hint: str | None
    text: str = Field(description="the whole error as one line, as the log shows it")


class ConfigRow(_Row):
    path: str
    revision: str | None
    applied_at: str | None
    errors: list[ConfigErrorRow] = Field(default_factory=list)


class GpuProcessRow(_Row):
    pid: int
    used_mib: int


class GpuRow(_Row):
    index: int
    uuid: str
    name: str
    vram_total_mib: int
    vram_used_mib: int
    vram_free_mib: int
    utilization_pct: int | None = None
    temperature_c: int | None = None
    simulated: bool = False
    processes: list[GpuProcessRow] = Field(default_factory=list)
    error: str | None = None


class ReplicaRow(_Row):
    id: str
    state: ReplicaState
    gpu: list[int]
    pid: int | None
    slots_total: int
    slots_busy: int
    vram_estimated_mib: int
    vram_measured_mib: int | None
    restarts: int
    last_error: str | None
    recent_errors: list[str] = Field(default_factory=list)
    retry_in_s: float | None = None
    spec_hash: str
    engine_version: str | None = None  # what the engine reported once up (llama.cpp's build)


class PoolRow(_Row):
    id: str
    model: str
    engine: str
    state: PoolState
    reason: str | None
    replicas_desired: int
    replicas: list[ReplicaRow] = Field(default_factory=list)


class QueueRow(_Row):
    depth: int
    by_priority: dict[str, int]
    capacity: int
    full_policy: str
    running: int


class StatusFile(_Row):
    """The whole of `.orch/status.json`."""

    daemon: DaemonRow
    config: ConfigRow
    gpus: list[GpuRow] = Field(default_factory=list)
    pools: list[PoolRow] = Field(default_factory=list)
    queue: QueueRow


def config_row(
    path: str, revision: str | None, applied_at: str | None, errors: list[loading.LoadError]
) -> ConfigRow:
    return ConfigRow(
        path=path,
        revision=revision,
        applied_at=applied_at,
        errors=[ConfigErrorRow(**e.as_dict(), text=str(e)) for e in errors],
    )


def gpu_row(g: observed.Gpu) -> GpuRow:
    return GpuRow(
        index=g.index,
        uuid=g.uuid,
        name=g.name,
        vram_total_mib=g.vram_total_mib,
        vram_used_mib=g.vram_used_mib,
        vram_free_mib=g.vram_free_mib,
        utilization_pct=g.utilization_pct,
        temperature_c=g.temperature_c,
        simulated=g.simulated,
        processes=[GpuProcessRow(pid=p.pid, used_mib=p.used_mib) for p in g.processes],
        error=g.error,
    )
