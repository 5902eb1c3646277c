"""The pool runtime: engine replicas started, watched, drained and stopped to match orch.yaml.

Each pass (`reconcile`) observes the GPUs, notices engine exits, compares each Ready replica's
measured VRAM with its estimate (a warning, once per replica, when they differ by more than
15 %), asks `resolving` what each pool wants (its model file resolved, downloaded or missing),
restarts replicas whose backoff has elapsed, asks `planning.plan` what to start and drain, and
acts through `booting`, whose starts and drains run as background coroutines that wake the loop
when they finish. The runtime holds the replica records (`fleet`), the drains requested over
HTTP (`state.drains`) and the engine records (`state.engine_records`), so a restarted daemon
adopts every started engine or stops it: no engine is ever left holding VRAM. Dispatch and
status read candidates, leases and pool states from it. Specs, VRAM arithmetic and pool state
are pure functions in `specs`; learned start-up times go to the `rates.Rates` the dispatcher
reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from plugins import interfaces, registry
from reconciler import (
    admission,
    booting,
    clocks,
    fetching,
    fleet,
    logs,
    placement,
    planning,
    rates,
    resolving,
    specs,
)
from reconciler.configuring import AppliedConfig
from state import desired, drains, engine_records, ids, observed, results, statusfile

log = logs.get("pools")


@dataclass
class PoolRuntime:
    plugins: registry.Registry
    observer: interfaces.GpuObserver
    state_dir: Path
    config: AppliedConfig
    clock: clocks.Clock
    wake: Callable[[], None]
    rates: rates.Rates = field(default_factory=rates.Rates)
    rng: random.Random = field(default_factory=random.Random)
    replicas: dict[ids.ReplicaId, fleet.Replica] = field(default_factory=dict)
    last_snapshot: observed.GpuSnapshot | None = None
    unschedulable: dict[str, planning.Unschedulable] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    problems: dict[str, str] = field(default_factory=dict)
    downloading: dict[str, str] = field(default_factory=dict)  # pool id → progress shown
    versions: dict[str, str] = field(default_factory=dict)
    # pools a reload is changing the spec of (reloading.Reloader) → the model each served
    # before it: never Failed to admission, and their tasks wait for the reload's outcome
    reloading: dict[str, str] = field(default_factory=dict)
    # models whose file failed its digest check → why (the catalog's; shown on their pools)
    blocked: Callable[[], Mapping[str, str]] = field(default=lambda: {})
    drained: dict[str, drains.Drain] = field(init=False)  # pool id → its drain request
    passes: int = 0  # reconcile passes done, so a waiter can tell one ran after a change
    fetches: fetching.Fetches = field(init=False)

    def __post_init__(self) -> None:
        self.drained = drains.load(self.state_dir)
        self.fetches = fetching.Fetches(clock=self.clock, wake=self.wake)

    # -- the pass ---------------------------------------------------------------------------

    async def reconcile(self) -> None:
        state = self.config.state
        if state is None:
            return
        observed_at = self.clock.monotonic()
        self.last_snapshot = await asyncio.to_thread(self.observer.observe)
        booting.notice_exits(self)
        for pool_id in [p for p in self.drained if state.pool(p) is None]:
            self.undrain(pool_id, "it is no longer in orch.yaml")
        self._compare_vram(observed_at)
        wants = resolving.wants(self, state)
        booting.restart_due(self, state)
        plan = planning.plan(wants, self._seen(), self._rooms(), reserve_mib=state.gpus.reserve_mib)
        self.unschedulable = {u.pool_id: u for u in plan.unschedulable}
        self.waiting = set(plan.waiting)
        for action in plan.actions:
            if isinstance(action, planning.Start):
                wanted = state.pool(action.pool_id)
                assert wanted is not None
                booting.start(self, wanted, state, action)
            elif isinstance(action, planning.Drain):
                reason = action.reason
                if action.pool_id in self.drained and reason == planning.SCALED_DOWN:
                    reason = "drain requested"
                booting.drain(self, action.replica_id, reason)
            elif isinstance(action, planning.Reclaim):
                booting.reclaim(self, action.replica_id)
        self.passes += 1

    def _seen(self) -> list[planning.ReplicaSeen]:
        out = []
        for r in self.replicas.values():
            if r.state == "Stopped":
                continue
            out.append(
                planning.ReplicaSeen(
                    replica_id=ids.ReplicaId(r.replica_id),
                    pool_id=ids.PoolId(r.pool_id),
                    spec_hash=r.spec.spec_hash,
                    devices=r.spec.devices,
                    state=r.state,
                    vram_mib=r.vram_mib,
                    service_key=specs.service_key(r.spec),
                    reclaimable=r.reclaimable,
                    busy_slots=len(r.leases),
                )
            )
        return out

    def _rooms(self) -> list[planning.GpuRoom]:
        loading = [
            specs.Loading(r.spec.devices, r.vram_mib, r.handle.pid if r.handle else None)
            for r in self.replicas.values()
            if r.state not in ("Stopped", "Failed", "BackingOff")
        ]
        return specs.gpu_rooms(self.last_snapshot, loading)

    def _compare_vram(self, observed_at: float) -> None:
        """Warn, once per replica, when NVML measures a Ready replica's process more than 15 %
        away from its estimate (only readings taken after it was Ready, warm-up done)."""
        measured = specs.measured_by_pid(self.last_snapshot)
        for r in self.replicas.values():
            ready_at = r.life.ready_at
            if r.vram_warned or r.state != "Ready" or r.handle is None or ready_at is None:
                continue
            if ready_at > observed_at:
                continue
            used = measured.get(r.handle.pid)
            off = specs.vram_off(r.vram_mib, used)
            if off is None:
                continue
            r.vram_warned = True
            logs.emit(
                log,
                "replica.vram_mismatch",
                f"Replica {r.replica_id} uses {used} MiB of VRAM, {off:+.0%} against its "
                f"estimate of {r.vram_mib} MiB; placement plans with the estimate, so "
                f"{'GPUs may be overcommitted' if off > 0 else 'room goes unused'}.",
                level=30,
                replica_id=r.replica_id,
                pool_id=r.pool_id,
                vram_estimated_mib=r.vram_mib,
                vram_measured_mib=used,
            )

    def stalled(self, replica_id: str, reason: str) -> None:
        """A Ready replica's engine sent no token for decode_idle_s while a task ran: it is
        hung (a GPU fault, a deadlock), and every task placed on it would stall the same way.
        It takes no task from now, its process is killed, and supervision restarts it with
        backoff (its breaker counts it as a failure) with `reason` shown."""
        r = self.replicas.get(ids.ReplicaId(replica_id))
        if r is None or r.state != "Ready" or r.handle is None or r.hung is not None:
            return
        r.hung, handle = reason, r.handle
        # a hung process may not act on SIGTERM at all (stopped, stuck in the driver)
        grace_s = min(1.0, self.config.state.timeouts.stop_grace_s if self.config.state else 1.0)
        logs.emit(
            log,
            "replica.hung",
            f"Replica {r.replica_id} is hung ({reason}); killing it to restart it.",
            level=40,
            replica_id=r.replica_id,
            pool_id=r.pool_id,
        )

        async def kill() -> None:
            with contextlib.suppress(Exception):
                await r.engine.stop(handle, grace_s=grace_s)
            if r.handle is handle and r.state == "Ready":
                self.crashed(r, reason)

        r.job = asyncio.get_running_loop().create_task(kill())

    def crashed(self, r: fleet.Replica, reason: str) -> None:
        r.hung = None
        r.handle = None
        r.leases.clear()  # the process is gone, and the slots with it
        self.forget_record(r.replica_id)
        now = self.clock.monotonic()
        r.life.exited(reason, now)
        if r.state == "Stopped":
            self.replicas.pop(r.replica_id, None)
            return
        level = 40 if r.state == "Failed" else 30
        what = (
            "circuit breaker open: not restarting"
            if r.state == "Failed"
            else f"restarting in {r.life.retry_in_s(now) or 0:.1f} s"
        )
        logs.emit(
            log,
            "replica.exited",
            f"Replica {r.replica_id} failed ({reason}); {what}.",
            level=level,
            replica_id=r.replica_id,
            pool_id=r.pool_id,
            reason=reason,
            restarts=r.life.restarts,
        )
        self.wake()

    def retry_pool(self, pool_id: str, why: str) -> None:
        """Give the pool's Failed replicas (their breaker open) a fresh start: an operator
        asked for the pool again (`why`)."""
        now = self.clock.monotonic()
        for r in self.replicas.values():
            if r.pool_id == pool_id and r.life.state == "Failed":
                r.life.reset(now)
                logs.emit(
                    log,
                    "replica.retried",
                    f"Replica {r.replica_id} will start again: {why}.",
                    replica_id=r.replica_id,
                    pool_id=r.pool_id,
                )
        self.wake()

    def retry_model(self, model_id: str) -> None:
        """Give the Failed replicas serving `model_id` a fresh start (its file was checked
        and passes now: a replica that gave up on it, UNTRUSTED_ARTIFACT, may start again)."""
        now = self.clock.monotonic()
        for r in self.replicas.values():
            if r.spec.model_id == model_id and r.life.state == "Failed":
                r.life.reset(now)
                logs.emit(
                    log,
                    "replica.retried",
                    f"Replica {r.replica_id} will start again: model {model_id}'s file was "
                    "verified.",
                    replica_id=r.replica_id,
                    pool_id=r.pool_id,
                )
        self.wake()

    # -- drains requested over HTTP (state.drains) --------------------------------------------

    def drain_pool(self, pool: desired.PoolSpec, *, deadline_ms: int) -> drains.Drain:
        """Record a drain of `pool` as it is configured now: the next pass drains its replicas
        (in-flight tasks get `deadline_ms`) and none is started until `undrain`. Idempotent:
        a pool already drained keeps its first record."""
        state = self.config.state
        assert state is not None
        spec = specs.spec_hash(pool, state.models[pool.model], state.engines.get(pool.engine))
        current = self.drained.get(pool.id)
        if current is not None and current.spec_hash == spec:
            return current
        record = drains.Drain(
            pool_id=pool.id,
            spec_hash=spec,
            deadline_ms=deadline_ms,
            drained_at=clocks.rfc3339(self.clock.now()),
        )
        self.redrain(record)
        logs.emit(
            log,
            "pool.drain_requested",
            f"Draining pool {pool.id} on request (in-flight tasks get {deadline_ms} ms); "
            "it stays drained until a reload or a change of its config.",
            pool_id=pool.id,
            deadline_ms=deadline_ms,
        )
        return record

    def redrain(self, record: drains.Drain) -> None:
        """Put a drain record (back) in place and persist it."""
        self.drained[record.pool_id] = record
        drains.save(self.state_dir, self.drained)
        self.wake()

    def undrain(self, pool_id: str, why: str) -> drains.Drain | None:
        """Lift a pool's drain; the record it had, if any."""
        record = self.drained.pop(pool_id, None)
        if record is not None:
            drains.save(self.state_dir, self.drained)
            logs.emit(
                log,
                "pool.undrained",
                f"Pool {pool_id} is no longer drained: {why}.",
                pool_id=pool_id,
            )
            self.wake()
        return record

    # -- engine records: adoption after a daemon restart -----------------------------------

    def write_record(self, r: fleet.Replica) -> None:
        assert r.handle is not None
        record = engine_records.EngineRecord(
            replica_id=r.replica_id,
            pool_id=r.pool_id,
            engine=r.spec.engine,
            spec_hash=r.spec.spec_hash,
            pid=r.handle.pid,
            port=r.handle.port,
            started_at=r.handle.started_at,
            log_path=str(r.handle.log_path),
            devices=list(r.spec.devices),
            vram_mib=r.vram_mib,
        )
        engine_records.write(self.state_dir, record)

    def forget_record(self, replica_id: str) -> None:
        engine_records.forget(self.state_dir, replica_id)

    async def shutdown(self) -> None:
        grace = self.config.state.timeouts.stop_grace_s if self.config.state else 10.0
        jobs = [r.job for r in self.replicas.values() if r.job is not None and not r.job.done()]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

        async def stop(r: fleet.Replica) -> None:
            if r.handle is not None:
                await r.engine.stop(r.handle, grace_s=grace)
            self.forget_record(r.replica_id)

        await asyncio.gather(*(stop(r) for r in self.replicas.values()), return_exceptions=True)
        self.replicas.clear()
        await self.fetches.shutdown()
        with contextlib.suppress(Exception):
            self.observer.close()

    # -- what dispatch and status read ------------------------------------------------------

    def candidates(self) -> list[placement.Candidate]:
        state = self.config.state if self.config is not None else None
        limits = {p.id: p.max_tokens for p in state.pools} if state is not None else {}
        return fleet.candidates(
            self.replicas.values(), self.last_snapshot, limits, now=self.clock.monotonic()
        )

    def lease(self, replica_id: ids.ReplicaId) -> fleet.Lease:
        r = self.replicas[replica_id]
        assert r.handle is not None and r.state == "Ready" and len(r.leases) < r.spec.slots
        lease = fleet.Lease(next(fleet.LEASE_NUMBERS), replica_id, r.engine, r.handle)
        r.leases.add(lease.number)
        return lease

    def release(self, lease: fleet.Lease) -> None:
        r = self.replicas.get(lease.replica_id)
        if r is not None:
            r.leases.discard(lease.number)

    def gpu_ref(self, replica_id: ids.ReplicaId | None) -> results.GpuRef | None:
        r = self.replicas.get(replica_id) if replica_id else None
        snapshot = self.last_snapshot
        gpu = snapshot.by_index(r.spec.devices[0]) if r and snapshot and r.spec.devices else None
        if gpu is None:
            return None
        return results.GpuRef(
            index=gpu.index, uuid=gpu.uuid, name=gpu.name, simulated=gpu.simulated
        )

    def gpu_indices(self) -> set[int] | None:
        """The GPU indices seen at the last observation (None before the first)."""
        snapshot = self.last_snapshot
        return {g.index for g in snapshot.gpus} if snapshot else None

    def engine_version(self, replica_id: ids.ReplicaId | None) -> str | None:
        return self.versions.get(replica_id or "")

    async def idle(self) -> None:
        """Wait until no replica is starting or draining (tests on a fake clock)."""
        jobs = [r.job for r in self.replicas.values() if r.job is not None and not r.job.done()]
        await asyncio.gather(*jobs, return_exceptions=True)

    def settled(self) -> bool:
        return all(r.state not in ("Starting", "Draining") for r in self.replicas.values())

    def pool_state(self, pool: desired.PoolSpec) -> tuple[statusfile.PoolState, str | None]:
        briefs = [
            specs.ReplicaBrief(r.replica_id, r.life.state, r.life.last_error, r.life.restarts)
            for r in self.replicas.values()
            if r.pool_id == pool.id
        ]
        return specs.pool_condition(
            pool,
            briefs,
            problem=self.problems.get(pool.id),
            unschedulable=self.unschedulable.get(pool.id),
            waiting=pool.id in self.waiting,
            drained=self._drained_reason(pool.id),
            downloading=self.downloading.get(pool.id),
            retired=_retired(self.config.state, pool.model),
        )

    def _drained_reason(self, pool_id: str) -> str | None:
        record = self.drained.get(pool_id)
        if record is None:
            return None
        return (
            f"drained on request at {record.drained_at}; POST /v1/pools/{pool_id}/reload "
            "serves it again, as does an edit in orch.yaml of what its replicas run (its model "
            "or ref, ctx, slots, flags, devices; not replicas or max_tokens)"
        )

    def views(self) -> dict[str, admission.PoolView]:
        state = self.config.state
        out: dict[str, admission.PoolView] = {}
        for pool in state.pools if state else ():
            s, reason = self.pool_state(pool)
            if pool.id in self.reloading and s in ("Failed", "Unschedulable"):
                # a reload that fails puts the old spec back: its tasks wait for that
                s, reason = "Progressing", f"reloading ({reason})"
            out[pool.id] = admission.PoolView(
                pool.id, pool.model, s, reason, pool.ctx, pool.max_tokens
            )
        return out

    def status_rows(self, *, stopping: bool = False) -> list[statusfile.PoolRow]:
        state = self.config.state
        blocked = self.blocked()
        now = self.clock.monotonic()
        rows = [
            fleet.pool_row(
                pool,
                ("Stopped", "daemon stopped")
                if stopping
                else _shown_blocked(self.pool_state(pool), pool.model, blocked),
                [r for r in self.replicas.values() if r.pool_id == pool.id],
                self.last_snapshot,
                now=now,
            )
            for pool in (state.pools if state else ())
        ]
        configured = {row.id for row in rows}
        gone: dict[str, list[fleet.Replica]] = {}
        for r in self.replicas.values():
            if r.pool_id not in configured:
                gone.setdefault(r.pool_id, []).append(r)
        rows += [
            fleet.gone_pool_row(pool_id, replicas, self.last_snapshot, now=now)
            for pool_id, replicas in sorted(gone.items())
        ]
        return rows


def _shown_blocked(
    condition: tuple[statusfile.PoolState, str | None],
    model_id: str,
    blocked: Mapping[str, str],
) -> tuple[statusfile.PoolState, str | None]:
    """A pool whose model failed its digest check may run, but admission refuses its tasks:
    its reason says so, before anything else."""
    if model_id not in blocked:
        return condition
    state, reason = condition
    why = (
        f"tasks refused (UNTRUSTED_ARTIFACT): model {model_id} failed verification: "
        f"{blocked[model_id]}; put the right file in place, then POST "
        f"/v1/catalog/models/{model_id}/verify"
    )
    return state, why + (f"; {reason}" if reason else "")


def _retired(state: desired.DesiredState | None, model_id: str) -> bool:
    model = state.models.get(model_id) if state else None
    return model is not None and model.state == "Retired"
