"""The pool runtime: engine replicas started, watched, drained and stopped to match orch.yaml.

Each pass (`reconcile`) observes the GPUs, notices engine exits, restarts replicas whose backoff
has elapsed, asks `planning.plan` what to start and drain, and acts. Starting and draining run
as background coroutines that wake the loop when they finish. Every started engine is recorded
under <state>/engines/<replica_id>.json, so a restarted daemon adopts it or stops it: no engine
is ever left holding VRAM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugins import interfaces, registry, resolvers
from reconciler import admission, clocks, estimates, logs, placement, planning, supervision
from reconciler.configuring import AppliedConfig
from state import atomic, desired, ids, observed, results

log = logs.get("pools")

DEFAULT_STARTUP_MS = 5000.0
DEFAULT_PRIOR = estimates.prior()
DEFAULT_MODEL_MIB = 1024  # planning size for a model whose file is not there and has no size_mib


@dataclass
class Replica:
    replica_id: str
    pool_id: str
    spec: interfaces.ReplicaSpec
    engine: interfaces.Engine
    vram_mib: int
    life: supervision.ReplicaLife
    handle: interfaces.ReplicaHandle | None = None
    leases: set[int] = field(default_factory=set)  # numbers of the slots leased now
    job: asyncio.Task[None] | None = None
    ready_ms: float | None = None

    @property
    def state(self) -> str:
        return self.life.state


@dataclass(frozen=True)
class Lease:
    """One slot of one engine process, held by one task. A lease outlives its process when
    the engine crashes mid-task; its number is then unknown to the restarted process, so its
    late release frees nothing there."""

    number: int
    replica_id: str
    engine: interfaces.Engine
    handle: interfaces.ReplicaHandle


_lease_numbers = itertools.count(1)


@dataclass
class PoolRuntime:
    plugins: registry.Registry
    observer: interfaces.GpuObserver
    state_dir: Path
    config: AppliedConfig
    clock: clocks.Clock
    wake: Callable[[], None]
    rng: random.Random = field(default_factory=random.Random)
    replicas: dict[str, Replica] = field(default_factory=dict)
    last_snapshot: observed.GpuSnapshot | None = None
    unschedulable: dict[str, planning.Unschedulable] = field(default_factory=dict)
    waiting: set[str] = field(default_factory=set)
    rates: dict[str, estimates.ServiceRate] = field(default_factory=dict)
    startup: dict[str, float] = field(default_factory=dict)
    problems: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    _priors_of: desired.DesiredState | None = None
    _priors: dict[str, estimates.ServiceRate] = field(default_factory=dict)

    @property
    def records(self) -> Path:
        folder = self.state_dir / "engines"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- desired specs ----------------------------------------------------------------------

    def _spec(
        self,
        pool: desired.PoolSpec,
        state: desired.DesiredState,
        replica_id: str,
        devices: tuple[int, ...],
    ) -> interfaces.ReplicaSpec:
        model = state.models[pool.model]
        scheme = model.ref.split(":", 1)[0] if ":" in model.ref else "file"
        resolver = self.plugins.resolvers.get(scheme)
        found = resolver(model.ref, self.config.base) if resolver else None
        path = found.path if found else None
        size = model.size_mib or (found.size_mib if found else None) or DEFAULT_MODEL_MIB
        options: dict[str, Any] = pool.sim.model_dump(mode="json") if pool.sim else {}
        engine_cfg = state.engines.get(pool.engine)
        if engine_cfg is not None:
            options["engine"] = engine_cfg.model_dump(mode="json")
        snapshot = self.last_snapshot
        # what the engine may use: the card less what processes outside llama-orch hold
        totals = (
            {
                g.index: g.vram_total_mib
                - max(0, g.vram_used_mib - sum(p.used_mib for p in g.processes))
                for g in snapshot.gpus
            }
            if snapshot
            else {}
        )
        options["vram_total_mib"] = {str(i): totals.get(i, 0) for i in devices}
        return interfaces.ReplicaSpec(
            replica_id=replica_id,
            pool_id=pool.id,
            engine=pool.engine,
            model_id=pool.model,
            model_ref=model.ref,
            model_path=path,
            model_size_mib=size,
            model_digest=model.digest,
            devices=devices,
            ctx=pool.ctx,
            slots=pool.slots,
            spec_hash=spec_hash(pool, model, engine_cfg),
            state_dir=self.state_dir,
            flags=tuple(pool.flags),
            env=dict(pool.env),
            options=options,
        )

    def _want(self, pool: desired.PoolSpec, state: desired.DesiredState) -> planning.PoolWant:
        engine = self.plugins.engines[pool.engine]
        probe = self._spec(
            pool,
            state,
            f"{pool.id}-probe",
            tuple(pool.devices) if isinstance(pool.devices, list) else (0,),
        )
        return planning.PoolWant(
            pool_id=ids.PoolId(pool.id),
            replicas=pool.replicas,
            devices=tuple(pool.devices) if isinstance(pool.devices, list) else None,
            vram_mib=engine.estimate_vram_mib(probe),
            spec_hash=probe.spec_hash,
        )

    # -- the pass ---------------------------------------------------------------------------

    async def reconcile(self) -> None:
        state = self.config.state
        if state is None:
            return
        self.last_snapshot = await asyncio.to_thread(self.observer.observe)
        self._notice_exits()
        wants = []
        for pool in state.pools:
            if pool.engine not in self.plugins.engines:
                self.problems[pool.id] = f"engine {pool.engine!r} is not installed"
                continue
            ref = state.models[pool.model].ref
            scheme = ref.split(":", 1)[0] if ":" in ref else "file"
            if scheme not in self.plugins.resolvers:
                known = ", ".join(f"{k}:" for k in sorted(self.plugins.resolvers))
                self.problems[pool.id] = (
                    f"no model resolver for {scheme}: refs (installed: {known}); "
                    "download the file and use a file: ref"
                )
                continue
            self.problems.pop(pool.id, None)
            wants.append(self._want(pool, state))
        self._restart_due(state)
        plan = planning.plan(wants, self._seen(), self._rooms(), reserve_mib=state.gpus.reserve_mib)
        self.unschedulable = {u.pool_id: u for u in plan.unschedulable}
        self.waiting = set(plan.waiting)
        for action in plan.actions:
            if isinstance(action, planning.Start):
                wanted = state.pool(action.pool_id)
                assert wanted is not None
                self._start(wanted, state, action)
            elif isinstance(action, planning.Drain):
                self._drain(action.replica_id, action.reason)

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
                    state=r.state,  # type: ignore[arg-type]  # Stopped is filtered above
                    vram_mib=r.vram_mib,
                )
            )
        return out

    def _rooms(self) -> list[planning.GpuRoom]:
        """Free VRAM per GPU, less what replicas still loading will take (not yet measured)."""
        snapshot = self.last_snapshot
        if snapshot is None:
            return []
        measured: dict[tuple[int, int], int] = {}
        for gpu in snapshot.gpus:
            for proc in gpu.processes:
                measured[(gpu.index, proc.pid)] = proc.used_mib
        pending: dict[int, int] = {}
        for r in self.replicas.values():
            if r.state in ("Stopped", "Failed", "BackingOff"):
                continue
            share = planning.share_mib(r.vram_mib, len(r.spec.devices))
            pid = r.handle.pid if r.handle else -1
            for index in r.spec.devices:
                pending[index] = pending.get(index, 0) + max(
                    0, share - measured.get((index, pid), 0)
                )
        return [
            planning.GpuRoom(
                index=g.index,
                total_mib=g.vram_total_mib,
                free_mib=max(0, g.vram_free_mib - pending.get(g.index, 0)),
            )
            for g in snapshot.gpus
        ]  # a GPU with a failed reading still counts

    def _notice_exits(self) -> None:
        for r in list(self.replicas.values()):
            if r.handle is None or r.state not in ("Ready",) or (r.job and not r.job.done()):
                continue
            exit_info = r.engine.poll_exit(r.handle)
            if exit_info is not None:
                self._crashed(r, exit_info.reason)

    def _crashed(self, r: Replica, reason: str) -> None:
        r.handle = None
        r.leases.clear()  # the process is gone, and the slots with it
        self._forget_record(r.replica_id)
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

    def _restart_due(self, state: desired.DesiredState) -> None:
        now = self.clock.monotonic()
        for r in list(self.replicas.values()):
            if r.state != "BackingOff" or not r.life.restart_due(now):
                continue
            pool = state.pool(r.pool_id)
            if pool is None or self._want(pool, state).spec_hash != r.spec.spec_hash:
                del self.replicas[r.replica_id]  # planning drains/replaces; nothing runs
                continue
            r.spec = self._spec(pool, state, r.replica_id, r.spec.devices)
            r.life.restarting(now)
            r.job = asyncio.get_running_loop().create_task(self._boot(r))

    def _start(
        self, pool: desired.PoolSpec, state: desired.DesiredState, action: planning.Start
    ) -> None:
        spec = self._spec(pool, state, action.replica_id, tuple(action.devices))
        engine = self.plugins.engines[pool.engine]
        life = supervision.ReplicaLife(
            action.replica_id, now=self.clock.monotonic(), random=self.rng.random
        )
        r = Replica(action.replica_id, pool.id, spec, engine, action.vram_mib, life)
        self.replicas[r.replica_id] = r
        logs.emit(
            log,
            "replica.starting",
            f"Starting replica {r.replica_id} of pool {pool.id} on GPU "
            f"{','.join(map(str, spec.devices))} (estimated {action.vram_mib} MiB).",
            replica_id=r.replica_id,
            pool_id=pool.id,
            devices=list(spec.devices),
            vram_estimated_mib=action.vram_mib,
        )
        r.job = asyncio.get_running_loop().create_task(self._boot(r))

    async def _boot(self, r: Replica) -> None:
        state = self.config.state
        ready_s = state.timeouts.ready_s if state else 120.0
        began = self.clock.monotonic()
        try:
            untrusted = await asyncio.to_thread(
                resolvers.verify, r.spec.model_path, r.spec.model_digest
            )
            if untrusted:
                r.life.give_up(untrusted, self.clock.monotonic())
                logs.emit(
                    log,
                    "replica.untrusted",
                    f"Replica {r.replica_id} not started: {untrusted}.",
                    level=40,
                    replica_id=r.replica_id,
                    pool_id=r.pool_id,
                )
                self.wake()
                return
            r.handle = await r.engine.start(r.spec)
            self._write_record(r)
            await r.engine.wait_ready(r.handle, timeout_s=ready_s)
        except interfaces.EngineStartError as exc:
            if r.handle is not None:
                with contextlib.suppress(Exception):
                    await r.engine.stop(r.handle, grace_s=1.0)
            self._crashed(r, exc.reason)
            return
        except interfaces.EnvironmentMissing as exc:
            r.handle = None
            # A missing driver or binary will not fix itself by restarting: open the
            # breaker at once (a config edit replaces the replica and starts afresh).
            r.life.give_up(exc.what, self.clock.monotonic())
            logs.emit(
                log,
                "replica.environment",
                f"Replica {r.replica_id} cannot start: {exc.what}",
                level=40,
                replica_id=r.replica_id,
                fix=exc.fix,
            )
            self.wake()
            return
        except asyncio.CancelledError:
            if r.handle is not None:
                with contextlib.suppress(Exception):
                    await r.engine.stop(r.handle, grace_s=1.0)
                self._forget_record(r.replica_id)
            raise
        r.ready_ms = (self.clock.monotonic() - began) * 1000
        # read before Ready, so the first task on the replica already reports the version
        with contextlib.suppress(Exception):  # shown, not required
            info = await asyncio.wait_for(r.engine.describe(r.handle), 5.0)
            self.versions[r.replica_id] = info.engine_version
        self.startup[r.pool_id] = r.ready_ms
        r.life.ready(self.clock.monotonic())
        logs.emit(
            log,
            "replica.ready",
            f"Replica {r.replica_id} is Ready (pid {r.handle.pid}, {r.ready_ms:.0f} ms).",
            replica_id=r.replica_id,
            pool_id=r.pool_id,
            pid=r.handle.pid,
        )
        self.wake()

    def _drain(self, replica_id: str, reason: str) -> None:
        r = self.replicas.get(replica_id)
        if r is None or r.state == "Draining":
            return
        if r.job is not None and not r.job.done():
            r.job.cancel()  # a replica still starting is simply stopped
        if r.life.drain(self.clock.monotonic()) == "Stopped":  # no process to stop
            self.replicas.pop(replica_id, None)
            return
        logs.emit(
            log,
            "replica.draining",
            f"Draining replica {replica_id}: {reason}.",
            replica_id=replica_id,
            pool_id=r.pool_id,
            reason=reason,
        )
        r.job = asyncio.get_running_loop().create_task(self._retire(r))

    async def _retire(self, r: Replica) -> None:
        state = self.config.state
        drain_s = state.timeouts.drain_s if state else 30.0
        grace_s = state.timeouts.stop_grace_s if state else 10.0
        deadline = self.clock.monotonic() + drain_s
        while r.leases and self.clock.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if r.handle is not None:
            exit_info = await r.engine.stop(r.handle, grace_s=grace_s)
            logs.emit(
                log,
                "replica.stopped",
                f"Stopped replica {r.replica_id} ({exit_info.reason}).",
                replica_id=r.replica_id,
                pool_id=r.pool_id,
            )
        self._forget_record(r.replica_id)
        r.handle = None
        self.replicas.pop(r.replica_id, None)
        self.wake()

    # -- engine records: adoption after a daemon restart -----------------------------------

    def _write_record(self, r: Replica) -> None:
        assert r.handle is not None
        atomic.write_json(
            self.records / f"{r.replica_id}.json",
            {
                "replica_id": r.replica_id,
                "pool_id": r.pool_id,
                "engine": r.spec.engine,
                "spec_hash": r.spec.spec_hash,
                "pid": r.handle.pid,
                "port": r.handle.port,
                "started_at": r.handle.started_at,
                "log_path": str(r.handle.log_path),
                "devices": list(r.spec.devices),
                "vram_mib": r.vram_mib,
            },
        )

    def _forget_record(self, replica_id: str) -> None:
        (self.records / f"{replica_id}.json").unlink(missing_ok=True)

    async def adopt_or_clean(self) -> None:
        """Engines recorded by a previous daemon: adopt the healthy, still-desired ones; stop
        every other one."""
        state = self.config.state
        self.last_snapshot = await asyncio.to_thread(self.observer.observe)
        for path in sorted(self.records.glob("*.json")):
            try:
                record: dict[str, Any] = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            engine = self.plugins.engines.get(str(record.get("engine")))
            pool = state.pool(str(record.get("pool_id"))) if state else None
            adopted = None
            if engine is not None and pool is not None and state is not None:
                spec = self._spec(
                    pool, state, str(record["replica_id"]), tuple(record.get("devices", []))
                )
                if spec.spec_hash == record.get("spec_hash"):
                    # adopt() checks pid, start time and health; it stops what it rejects
                    adopted = await engine.adopt(record, spec)
            if adopted is None:
                await _kill_recorded(record)
                path.unlink(missing_ok=True)
                logs.emit(
                    log,
                    "replica.cleaned",
                    f"Stopped engine pid {record.get('pid')} left by a previous daemon "
                    f"({record.get('replica_id')}).",
                    replica_id=record.get("replica_id"),
                )
                continue
            assert engine is not None and pool is not None
            life = supervision.ReplicaLife(
                ids.ReplicaId(str(record["replica_id"])),
                now=self.clock.monotonic(),
                random=self.rng.random,
            )
            life.ready(self.clock.monotonic())
            r = Replica(
                str(record["replica_id"]),
                pool.id,
                adopted.spec,
                engine,
                int(record.get("vram_mib", 0)),
                life,
                handle=adopted,
            )
            self.replicas[r.replica_id] = r
            logs.emit(
                log,
                "replica.adopted",
                f"Adopted replica {r.replica_id} (pid {adopted.pid}) from a previous daemon.",
                replica_id=r.replica_id,
                pool_id=r.pool_id,
                pid=adopted.pid,
            )

    async def shutdown(self) -> None:
        grace = self.config.state.timeouts.stop_grace_s if self.config.state else 10.0
        jobs = [r.job for r in self.replicas.values() if r.job is not None and not r.job.done()]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

        async def stop(r: Replica) -> None:
            if r.handle is not None:
                await r.engine.stop(r.handle, grace_s=grace)
            self._forget_record(r.replica_id)

        await asyncio.gather(*(stop(r) for r in self.replicas.values()), return_exceptions=True)
        self.replicas.clear()
        with contextlib.suppress(Exception):
            self.observer.close()

    # -- what dispatch and status read ------------------------------------------------------

    def candidates(self) -> list[placement.Candidate]:
        out = []
        for r in self.replicas.values():
            if r.state not in ("Ready", "Starting"):
                continue
            out.append(
                placement.Candidate(
                    replica_id=ids.ReplicaId(r.replica_id),
                    pool_id=ids.PoolId(r.pool_id),
                    model_id=ids.ModelId(r.spec.model_id),
                    state=r.state,
                    slots_total=r.spec.slots,
                    slots_busy=len(r.leases),
                    gpu_free_mib=self._gpu_free(r.spec.devices),
                    devices=r.spec.devices,
                    ctx=r.spec.ctx,
                )
            )
        return out

    def _gpu_free(self, devices: tuple[int, ...]) -> int:
        snapshot = self.last_snapshot
        if snapshot is None:
            return 0
        frees = [g.vram_free_mib for g in snapshot.gpus if g.index in devices]
        return min(frees, default=0)

    def lease(self, replica_id: str) -> Lease:
        r = self.replicas[replica_id]
        assert r.handle is not None and r.state == "Ready" and len(r.leases) < r.spec.slots
        lease = Lease(next(_lease_numbers), replica_id, r.engine, r.handle)
        r.leases.add(lease.number)
        return lease

    def release(self, lease: Lease) -> None:
        r = self.replicas.get(lease.replica_id)
        if r is not None:
            r.leases.discard(lease.number)

    def gpu_ref(self, replica_id: str | None) -> results.GpuRef | None:
        r = self.replicas.get(replica_id or "")
        snapshot = self.last_snapshot
        if r is None or snapshot is None or not r.spec.devices:
            return None
        gpu = snapshot.by_index(r.spec.devices[0])
        if gpu is None:
            return None
        return results.GpuRef(
            index=gpu.index, uuid=gpu.uuid, name=gpu.name, simulated=gpu.simulated
        )

    def rate(self, pool_id: str) -> estimates.ServiceRate:
        if pool_id in self.rates:
            return self.rates[pool_id]
        state = self.config.state
        if state is not self._priors_of:  # the priors come from the applied config
            self._priors_of = state
            self._priors = {}
            for pool in state.pools if state else ():
                if pool.sim is not None:
                    self._priors[pool.id] = estimates.prior(
                        pool.sim.tokens_per_s, pool.sim.first_token_ms + 1.0
                    )
        return self._priors.get(pool_id) or DEFAULT_PRIOR

    def observe(
        self, pool_id: str, *, tokens: int, decode_ms: float, first_token_ms: float
    ) -> None:
        if tokens > 0:
            self.rates[pool_id] = estimates.observe(
                self.rate(pool_id),
                tokens=tokens,
                decode_ms=max(decode_ms, 1.0),
                first_token_ms=first_token_ms,
            )

    def engine_version(self, replica_id: str | None) -> str | None:
        return self.versions.get(replica_id or "")

    def startup_ms(self, pool_id: str) -> float:
        if pool_id in self.startup:
            return self.startup[pool_id]
        state = self.config.state
        pool = state.pool(pool_id) if state else None
        if pool is not None and pool.sim is not None:
            return pool.sim.load_s * 1000 + 200
        return DEFAULT_STARTUP_MS

    async def idle(self) -> None:
        """Wait until no replica is starting or draining (tests on a fake clock)."""
        jobs = [r.job for r in self.replicas.values() if r.job is not None and not r.job.done()]
        await asyncio.gather(*jobs, return_exceptions=True)

    def settled(self) -> bool:
        return all(r.state not in ("Starting", "Draining") for r in self.replicas.values())

    def pool_state(self, pool: desired.PoolSpec) -> tuple[str, str | None]:
        mine = [r for r in self.replicas.values() if r.pool_id == pool.id]
        if pool.id in self.problems:
            return "Failed", self.problems[pool.id]
        if pool.id in self.unschedulable:
            return "Unschedulable", self.unschedulable[pool.id].message
        ready = [r for r in mine if r.state == "Ready"]
        failed = [r for r in mine if r.state == "Failed"]
        if pool.replicas > 0 and failed and len(failed) == len(mine) and not ready:
            return "Failed", failed[0].life.last_error
        if len(ready) >= pool.replicas and all(r.state == "Ready" for r in mine):
            return "Ready", None
        if pool.id in self.waiting:
            return "Progressing", "waiting for VRAM that draining replicas will free"
        busy = [r for r in mine if r.state != "Ready"]
        why = ", ".join(f"{r.replica_id} {r.state}" for r in busy) or "starting replicas"
        if ready and busy:
            return "Ready", why  # serving while converging
        return "Progressing", why

    def views(self) -> dict[str, admission.PoolView]:
        state = self.config.state
        out: dict[str, admission.PoolView] = {}
        if state is None:
            return out
        for pool in state.pools:
            s, reason = self.pool_state(pool)
            out[pool.id] = admission.PoolView(
                pool.id, pool.model, s, reason, pool.ctx, pool.max_tokens
            )
        return out

    def status(self, *, stopping: bool = False) -> list[dict[str, Any]]:
        state = self.config.state
        if state is None:
            return []
        snapshot = self.last_snapshot
        measured: dict[int, int] = {}
        for gpu in snapshot.gpus if snapshot else ():
            for proc in gpu.processes:
                measured[proc.pid] = measured.get(proc.pid, 0) + proc.used_mib
        pools_out = []
        for pool in state.pools:
            s, reason = ("Stopped", "daemon stopped") if stopping else self.pool_state(pool)
            reps = []
            for r in sorted(
                (r for r in self.replicas.values() if r.pool_id == pool.id),
                key=lambda r: r.replica_id,
            ):
                reps.append(
                    {
                        "id": r.replica_id,
                        "state": r.state,
                        "gpu": list(r.spec.devices),
                        "pid": r.handle.pid if r.handle else None,
                        "slots_total": r.spec.slots,
                        "slots_busy": len(r.leases),
                        "vram_estimated_mib": r.vram_mib,
                        "vram_measured_mib": measured.get(r.handle.pid) if r.handle else None,
                        "restarts": r.life.restarts,
                        "last_error": r.life.last_error,
                        "recent_errors": list(r.life.reasons),
                        "retry_in_s": r.life.retry_in_s(self.clock.monotonic()),
                        "spec_hash": r.spec.spec_hash,
                    }
                )
            pools_out.append(
                {
                    "id": pool.id,
                    "model": pool.model,
                    "engine": pool.engine,
                    "state": s,
                    "reason": reason,
                    "replicas_desired": pool.replicas,
                    "replicas": reps,
                }
            )
        return pools_out


def spec_hash(
    pool: desired.PoolSpec, model: desired.ModelSpec, engine: desired.EngineSpec | None
) -> str:
    """What identifies a replica's config: a change means drain and replace. `replicas` and
    placement-free fields are left out, so scaling never restarts unchanged replicas."""
    material = {
        "pool": pool.model_dump(mode="json", exclude={"replicas"}),
        "model": model.model_dump(mode="json", exclude={"state"}),
        "engine": engine.model_dump(mode="json") if engine else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


async def _kill_recorded(record: dict[str, Any]) -> None:
    """Last resort for a recorded engine nobody adopted: SIGKILL its process group if it is
    still the same process (pid and start time match)."""
    from plugins import processes

    pid, started = record.get("pid"), record.get("started_at")
    if isinstance(pid, int) and processes.pid_alive(pid, started):
        await processes.kill_group(pid)
