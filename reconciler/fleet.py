"""The replicas the pool runtime holds, the slot leases on them, and what is read from them:
placement candidates and status rows.

`pools.PoolRuntime` owns the `Replica` records and changes them; the dispatcher holds `Lease`s
(through the runtime's `lease`/`release`); `candidates` and `pool_row` turn the records into
the plain data placement and status.json take.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from plugins import interfaces
from reconciler import placement, specs, supervision
from state import desired, ids, observed, statusfile


@dataclass
class Replica:
    replica_id: ids.ReplicaId
    pool_id: ids.PoolId
    spec: interfaces.ReplicaSpec
    engine: interfaces.Engine
    vram_mib: int
    life: supervision.ReplicaLife
    handle: interfaces.ReplicaHandle | None = None
    leases: set[int] = field(default_factory=set)  # numbers of the slots leased now
    job: asyncio.Task[None] | None = None
    ready_ms: float | None = None
    vram_warned: bool = False  # the estimate-vs-measured warning is given once per replica
    hung: str | None = None  # why it is being killed as hung: it takes no task meanwhile
    engine_version: str | None = None  # what the engine reported once up
    stopping: bool = False  # its retirement is stopping the process: it cannot serve again

    @property
    def reclaimable(self) -> bool:
        """Draining, drained while Ready, its process not being stopped: it may serve again."""
        return (
            self.state == "Draining"
            and self.life.drained_ready
            and not self.stopping
            and self.handle is not None
            and self.hung is None
        )

    @property
    def state(self) -> statusfile.ReplicaState:
        return self.life.state


@dataclass(frozen=True)
class Lease:
    """One slot of one engine process, held by one task. A lease outlives its process when
    the engine crashes mid-task; its number is then unknown to the restarted process, so its
    late release frees nothing there."""

    number: int
    replica_id: ids.ReplicaId
    engine: interfaces.Engine
    handle: interfaces.ReplicaHandle


LEASE_NUMBERS = itertools.count(1)  # lease numbers are never reused within a daemon


def candidates(
    replicas: Iterable[Replica],
    snapshot: observed.GpuSnapshot | None,
    limits: Mapping[str, int | None] | None = None,
    now: float | None = None,
) -> list[placement.Candidate]:
    """Every replica that serves or will soon serve, as placement sees it; `limits`: each
    pool's max_tokens as orch.yaml says it now (not in a replica's spec: raising it restarts
    nothing); `now`: the pools' clock, for how long a Starting replica has been loading."""
    limits = limits or {}
    return [
        placement.Candidate(
            replica_id=r.replica_id,
            pool_id=r.pool_id,
            model_id=ids.ModelId(r.spec.model_id),
            state=r.state,
            slots_total=r.spec.slots,
            slots_busy=len(r.leases),
            gpu_free_mib=specs.gpu_free_mib(snapshot, r.spec.devices),
            devices=r.spec.devices,
            ctx=r.spec.ctx,
            max_tokens=limits.get(r.pool_id),
            starting_ms=(
                max(0.0, (now - r.life.started_at) * 1000)
                if now is not None and r.state == "Starting"
                else 0.0
            ),
        )
        for r in replicas
        if r.state in ("Ready", "Starting") and r.hung is None
    ]


def pool_row(
    pool: desired.PoolSpec,
    condition: tuple[statusfile.PoolState, str | None],
    replicas: Iterable[Replica],
    snapshot: observed.GpuSnapshot | None,
    *,
    now: float,
) -> statusfile.PoolRow:
    """One pool of status.json, its replicas sorted by id, with measured VRAM beside the
    estimate."""
    state, reason = condition
    return statusfile.PoolRow(
        id=pool.id,
        model=pool.model,
        engine=pool.engine,
        state=state,
        reason=reason,
        replicas_desired=pool.replicas,
        replicas=_replica_rows(replicas, snapshot, now=now),
    )


def gone_pool_row(
    pool_id: str, replicas: list[Replica], snapshot: observed.GpuSnapshot | None, *, now: float
) -> statusfile.PoolRow:
    """A pool orch.yaml no longer has (removed or renamed) whose replicas still drain: shown
    until they are gone, so what holds the GPU and runs the tasks stays visible."""
    spec = replicas[0].spec
    return statusfile.PoolRow(
        id=pool_id,
        model=spec.model_id,
        engine=spec.engine,
        state="Stopped",
        reason="not in orch.yaml any more: its replicas drain (the tasks running finish, "
        "within timeouts.drain_s), then stop",
        replicas_desired=0,
        replicas=_replica_rows(replicas, snapshot, now=now),
    )


def _replica_rows(
    replicas: Iterable[Replica], snapshot: observed.GpuSnapshot | None, *, now: float
) -> list[statusfile.ReplicaRow]:
    measured = specs.measured_by_pid(snapshot)
    return [
        statusfile.ReplicaRow(
            id=r.replica_id,
            state=r.state,
            gpu=list(r.spec.devices),
            pid=r.handle.pid if r.handle else None,
            slots_total=r.spec.slots,
            slots_busy=len(r.leases),
            vram_estimated_mib=r.vram_mib,
            vram_measured_mib=measured.get(r.handle.pid) if r.handle else None,
            restarts=r.life.restarts,
            last_error=r.life.last_error,
            recent_errors=list(r.life.reasons),
            retry_in_s=r.life.retry_in_s(now),
            spec_hash=r.spec.spec_hash,
            engine_version=r.engine_version,
        )
        for r in sorted(replicas, key=lambda r: r.replica_id)
    ]
