"""Bringing one replica up and taking it down, as the pool runtime's pass decides.

The pass calls `start` (a new replica of a pool, after `planning.plan`), `drain` (a replica to
retire), `restart_due` (replicas whose backoff has elapsed) and `notice_exits` (Ready engines
that exited, handed to the runtime's `crashed`); each returns at once and leaves the work to a
background coroutine that wakes the loop when it finishes. Up, `boot(runtime, replica)`: the
model file's digest checked, the engine spawned and recorded (so a restarted daemon can adopt or
stop it), its health waited for, one warm-up request, then Ready; failures go back to the
runtime's supervision (`crashed`). Down, `retire(runtime, replica)`: in-flight tasks given the
drain time, then the engine stopped and its record forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from plugins import interfaces, resolvers
from reconciler import fleet, logs, planning, resolving, supervision
from state import desired, errors, failpoints, ids

if TYPE_CHECKING:
    from reconciler import pools

log = logs.get("pools")

WARM_UP_PROMPT = "Hello"
WARM_UP_MIN_S = 5.0  # the warm-up's time when the ready timeout is nearly spent
EXIT_WAIT_POLLS = 50  # × 20 ms: how long a broken warm-up waits for the exit status


def start(
    runtime: pools.PoolRuntime,
    pool: desired.PoolSpec,
    state: desired.DesiredState,
    action: planning.Start,
) -> None:
    """Add the replica `action` places and boot it in the background."""
    spec = resolving.spec_for(runtime, pool, state, action.replica_id, tuple(action.devices))
    engine = runtime.plugins.engines[pool.engine]
    life = supervision.ReplicaLife(
        action.replica_id, now=runtime.clock.monotonic(), random=runtime.rng.random
    )
    r = fleet.Replica(action.replica_id, ids.PoolId(pool.id), spec, engine, action.vram_mib, life)
    runtime.replicas[r.replica_id] = r
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
    r.job = asyncio.get_running_loop().create_task(boot(runtime, r))


def restart_due(runtime: pools.PoolRuntime, state: desired.DesiredState) -> None:
    """Boot again every replica whose backoff has elapsed, with its spec as configured now;
    one whose pool is gone, drained or changed is dropped instead (planning replaces it)."""
    now = runtime.clock.monotonic()
    for r in list(runtime.replicas.values()):
        if r.state != "BackingOff" or not r.life.restart_due(now):
            continue
        pool = state.pool(r.pool_id)
        want = resolving.want(runtime, pool, state) if pool is not None else None
        if (
            pool is None
            or want is None
            or pool.id in runtime.drained
            or (want.spec_hash != r.spec.spec_hash)
        ):
            del runtime.replicas[r.replica_id]  # planning drains/replaces; nothing runs
            continue
        r.spec = resolving.spec_for(runtime, pool, state, r.replica_id, r.spec.devices)
        # the model file may be another version now (replaced, repaired, at the same ref):
        # booked at the estimate of what this start loads, not of what the first one did
        r.vram_mib = want.vram_mib
        r.vram_warned = False
        r.life.restarting(now)
        r.job = asyncio.get_running_loop().create_task(boot(runtime, r))


def notice_exits(runtime: pools.PoolRuntime) -> None:
    """Hand every Ready replica whose engine exited to the runtime's supervision."""
    for r in list(runtime.replicas.values()):
        if r.handle is None or r.state not in ("Ready",) or (r.job and not r.job.done()):
            continue
        exit_info = r.engine.poll_exit(r.handle)
        if exit_info is not None:
            runtime.crashed(r, exit_info.reason)


def drain(runtime: pools.PoolRuntime, replica_id: ids.ReplicaId, reason: str) -> None:
    """Retire one replica in the background; one still starting is simply stopped."""
    r = runtime.replicas.get(replica_id)
    if r is None or r.state == "Draining":
        return
    if r.job is not None and not r.job.done():
        r.job.cancel()  # a replica still starting is simply stopped
    if r.life.drain(runtime.clock.monotonic()) == "Stopped":  # no process to stop
        runtime.replicas.pop(replica_id, None)
        return
    logs.emit(
        log,
        "replica.draining",
        f"Draining replica {replica_id}: {reason}.",
        replica_id=replica_id,
        pool_id=r.pool_id,
        reason=reason,
    )
    r.job = asyncio.get_running_loop().create_task(retire(runtime, r))


def reclaim(runtime: pools.PoolRuntime, replica_id: ids.ReplicaId) -> None:
    """Stop retiring a Draining replica whose spec its pool wants again (an edit undone, a
    failed reload put back): its running tasks go on and it takes new ones."""
    r = runtime.replicas.get(replica_id)
    if r is None or not r.reclaimable:
        return
    if r.job is not None and not r.job.done():
        r.job.cancel()  # it waits for leases to end: nothing is stopped yet
    r.job = None
    r.life.reclaim(runtime.clock.monotonic())
    logs.emit(
        log,
        "replica.reclaimed",
        f"Replica {replica_id} serves again: orch.yaml wants its spec again before it "
        "stopped, so its running tasks go on and nothing restarts.",
        replica_id=replica_id,
        pool_id=r.pool_id,
    )
    runtime.wake()


async def boot(runtime: pools.PoolRuntime, r: fleet.Replica) -> None:
    """Start one replica: verify its model file, spawn the engine, record it, wait for
    health, warm it up, then mark it Ready (or hand the failure to supervision)."""
    state = runtime.config.state
    ready_s = state.timeouts.ready_s if state else 120.0
    began = runtime.clock.monotonic()
    try:
        untrusted = await asyncio.to_thread(
            resolvers.verify, r.spec.model_path, r.spec.model_digest
        )
        if untrusted:
            r.life.give_up(untrusted, runtime.clock.monotonic())
            logs.emit(
                log,
                "replica.untrusted",
                f"Replica {r.replica_id} not started: {untrusted}.",
                level=40,
                replica_id=r.replica_id,
                pool_id=r.pool_id,
            )
            runtime.wake()
            return
        r.handle = await r.engine.start(r.spec)
        failpoints.hit("after_engine_spawn")
        try:
            runtime.write_record(r)
        except OSError as exc:  # a full disk: an engine no record names is stopped, retried
            why = f"could not record the engine process: {exc}"
            raise interfaces.EngineStartError(why) from exc
        failpoints.hit("after_engine_record")
        await r.engine.wait_ready(r.handle, timeout_s=ready_s)
        left_s = ready_s - (runtime.clock.monotonic() - began)
        await warm_up(r, timeout_s=max(left_s, WARM_UP_MIN_S))
    except interfaces.EngineStartError as exc:
        if r.handle is not None:
            with contextlib.suppress(Exception):
                await r.engine.stop(r.handle, grace_s=1.0)
        runtime.crashed(r, exc.reason)
        return
    except errors.EnvironmentMissing as exc:
        r.handle = None
        # A missing driver or binary will not fix itself by restarting: open the
        # breaker at once (a config edit replaces the replica and starts afresh).
        fix = " ".join(exc.fix.split())
        r.life.give_up(f"{exc.what}. Fix: {fix}", runtime.clock.monotonic())  # in status too
        logs.emit(
            log,
            "replica.environment",
            f"Replica {r.replica_id} cannot start: {exc.what}. Fix: {fix}",
            level=40,
            replica_id=r.replica_id,
            fix=exc.fix,
        )
        runtime.wake()
        return
    except asyncio.CancelledError:
        if r.handle is not None:
            with contextlib.suppress(Exception):
                await r.engine.stop(r.handle, grace_s=1.0)
            runtime.forget_record(r.replica_id)
        raise
    r.ready_ms = (runtime.clock.monotonic() - began) * 1000
    # read before Ready, so the first task on the replica already reports the version
    with contextlib.suppress(Exception):  # shown, not required
        info = await asyncio.wait_for(r.engine.describe(r.handle), 5.0)
        runtime.versions[r.replica_id] = r.engine_version = info.engine_version
    runtime.rates.started(r.pool_id, r.ready_ms)
    r.life.ready(runtime.clock.monotonic())
    logs.emit(
        log,
        "replica.ready",
        f"Replica {r.replica_id} is Ready (pid {r.handle.pid}, {r.ready_ms:.0f} ms).",
        replica_id=r.replica_id,
        pool_id=r.pool_id,
        pid=r.handle.pid,
    )
    runtime.wake()


async def warm_up(r: fleet.Replica, *, timeout_s: float) -> None:
    """One 1-token completion before Ready: an engine's first request pays for lazy
    allocations and kernel loading, and it should not be a user's task. Raises
    EngineStartError (with the exit, when the process died) if it fails."""
    assert r.handle is not None
    request = interfaces.GenerateRequest(
        task_id=f"warm-up-{r.replica_id}", prompt=WARM_UP_PROMPT, max_tokens=1, seed=0
    )
    stream = r.engine.generate(r.handle, request)
    try:
        async with asyncio.timeout(timeout_s):
            async for _ in stream:
                pass
    except (interfaces.EngineStreamError, TimeoutError) as exc:
        ended = await exit_soon(r.engine, r.handle)
        why = ended.reason if ended is not None else str(exc) or "timed out"
        raise interfaces.EngineStartError(f"warm-up request failed: {why}", exit=ended) from exc
    finally:
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()


async def exit_soon(
    engine: interfaces.Engine, handle: interfaces.ReplicaHandle
) -> interfaces.ExitInfo | None:
    """The exit of a process whose stream just broke: the broken connection usually
    arrives a moment before the exit status, and the status says why."""
    for _ in range(EXIT_WAIT_POLLS):
        ended = engine.poll_exit(handle)
        if ended is not None:
            return ended
        await asyncio.sleep(0.02)
    return None


async def retire(runtime: pools.PoolRuntime, r: fleet.Replica) -> None:
    """Take one replica down: no new leases (the runtime stopped giving them), in-flight
    tasks given the drain time (a requested drain's own deadline wins), then SIGTERM, grace,
    SIGKILL; its record forgotten."""
    state = runtime.config.state
    grace_s = state.timeouts.stop_grace_s if state else 10.0
    began = runtime.clock.monotonic()

    def drain_s() -> float:
        """As orch.yaml says it now: raised during the drain, it gives the tasks longer."""
        if (requested := runtime.drained.get(r.pool_id)) is not None:
            return requested.deadline_ms / 1000
        state = runtime.config.state
        return state.timeouts.drain_s if state else 30.0

    while r.leases and runtime.clock.monotonic() < began + drain_s():
        await asyncio.sleep(0.05)
    r.stopping = True  # from here on it cannot be reclaimed
    if r.handle is not None:
        exit_info = await r.engine.stop(r.handle, grace_s=grace_s)
        logs.emit(
            log,
            "replica.stopped",
            f"Stopped replica {r.replica_id} ({exit_info.reason}).",
            replica_id=r.replica_id,
            pool_id=r.pool_id,
        )
        failpoints.hit("after_engine_stop")
    runtime.forget_record(r.replica_id)
    r.handle = None
    runtime.replicas.pop(r.replica_id, None)
    runtime.wake()
