"""Adoption after a daemon restart: engines recorded by a previous daemon are adopted when
healthy and still desired, and stopped otherwise, so none is left holding VRAM.

The daemon calls `adopt_or_clean(runtime)` once at startup, before its first pass.
"""

from __future__ import annotations

import asyncio
import contextlib

from plugins import processes
from reconciler import fleet, logs, pools, resolving, supervision
from state import engine_records, ids

log = logs.get("adoption")


async def adopt_or_clean(runtime: pools.PoolRuntime) -> None:
    """Engines recorded by a previous daemon: adopt the healthy, still-desired ones; stop
    every other one, and every engine of this folder that was never recorded."""
    runtime.last_snapshot = await asyncio.to_thread(runtime.observer.observe)
    records, unreadable = engine_records.read_all(runtime.state_dir)
    for path in unreadable:
        path.unlink(missing_ok=True)
    # each checked at once: an engine that does not answer its health check costs its
    # timeout and stop grace (about 12 s), and one frozen engine would hold up the others
    adopted = await asyncio.gather(*(_adopt_or_stop(runtime, record) for record in records))
    for r in adopted:  # in the records' order, whichever answered first
        if r is not None:
            runtime.replicas[r.replica_id] = r
    await stop_unrecorded(runtime)


async def _adopt_or_stop(
    runtime: pools.PoolRuntime, record: engine_records.EngineRecord
) -> fleet.Replica | None:
    """The replica of the engine `record` names, adopted when it is healthy and still
    desired; else None, the engine stopped."""
    state = runtime.config.state
    engine = runtime.plugins.engines.get(record.engine)
    pool = state.pool(record.pool_id) if state else None
    adopted = None
    if engine is not None and pool is not None and state is not None:
        spec = resolving.spec_for(runtime, pool, state, record.replica_id, tuple(record.devices))
        if spec.spec_hash == record.spec_hash:
            # adopt() checks pid, start time and health; it stops what it rejects
            adopted = await engine.adopt(record.model_dump(), spec)
    if engine is None or pool is None or adopted is None:
        await _kill_recorded(record)
        engine_records.forget(runtime.state_dir, record.replica_id)
        logs.emit(
            log,
            "replica.cleaned",
            f"Stopped engine pid {record.pid} left by a previous daemon ({record.replica_id}).",
            replica_id=record.replica_id,
        )
        return None
    now = runtime.clock.monotonic()
    life = supervision.ReplicaLife(
        ids.ReplicaId(record.replica_id), now=now, random=runtime.rng.random
    )
    life.ready(now)
    r = fleet.Replica(
        ids.ReplicaId(record.replica_id),
        ids.PoolId(pool.id),
        adopted.spec,
        engine,
        record.vram_mib,
        life,
        adopted,
    )
    # as a start does: results, traces and metrics name the engine's version
    with contextlib.suppress(Exception):  # shown, not required
        info = await asyncio.wait_for(engine.describe(adopted), 5.0)
        runtime.versions[r.replica_id] = r.engine_version = info.engine_version
    logs.emit(
        log,
        "replica.adopted",
        f"Adopted replica {r.replica_id} (pid {adopted.pid}) from a previous daemon.",
        replica_id=r.replica_id,
        pool_id=r.pool_id,
        pid=adopted.pid,
    )
    return r


async def stop_unrecorded(runtime: pools.PoolRuntime) -> None:
    """Engines of this folder that no record names (a daemon killed between spawning an
    engine and recording it): found by the marker in their environment, and stopped."""
    known = {r.handle.pid for r in runtime.replicas.values() if r.handle is not None}
    marked = await asyncio.to_thread(processes.find_marked, runtime.state_dir)
    for pid, replica_id in sorted(marked.items()):
        if pid in known:
            continue
        await processes.kill_group(pid)
        logs.emit(
            log,
            "replica.cleaned",
            f"Stopped engine pid {pid} ({replica_id or 'unknown replica'}) that a previous "
            "daemon started but never recorded.",
            replica_id=replica_id or None,
            pid=pid,
        )


async def _kill_recorded(record: engine_records.EngineRecord) -> None:
    """Last resort for a recorded engine nobody adopted: SIGKILL its process group if it is
    still the same process (pid and start time match)."""
    if processes.pid_alive(record.pid, record.started_at):
        await processes.kill_group(record.pid)
