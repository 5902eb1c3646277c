"""Replica specs, the VRAM arithmetic around them, and a pool's state: pure functions.

The pool runtime calls `replica_spec` for every replica it starts or adopts (with the model
file already resolved), `spec_hash` to tell whether a running replica still matches
orch.yaml, `gpu_rooms` and `gpu_free_mib` for planning and placement, and `pool_condition`
for status and admission. Nothing here reads a clock, a GPU or a file.

VRAM rules:
- What an engine may use on a GPU (`engine_room_mib`): the card's total less what processes
  outside llama-orch hold (NVML's used minus the per-process figures it reports).
- Free room for planning (`gpu_rooms`): NVML's free less what replicas still loading will
  take and NVML does not show yet (their estimate minus what their process already holds).
- An estimate is off (`vram_off`) when NVML measures the replica's process more than
  `VRAM_TOLERANCE` (15 %) away from it, either way: planning trusts the estimate, so too low
  overcommits a GPU and too high leaves room unused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import interfaces
from reconciler import planning
from state import desired, observed, statusfile

DEFAULT_MODEL_MIB = 1024  # planning size for a model whose file is not there and has no size_mib
VRAM_TOLERANCE = 0.15


def spec_hash(
    pool: desired.PoolSpec, model: desired.ModelSpec, engine: desired.EngineSpec | None
) -> str:
    """What identifies a replica's config: a change means drain and replace. What no engine
    is started with is left out: `replicas`, so scaling never restarts unchanged replicas, and
    `max_tokens`, an admission limit (raising it must not stop the tasks running)."""
    material = {
        "pool": pool.model_dump(mode="json", exclude={"replicas", "max_tokens"}),
        "model": model.model_dump(mode="json", exclude={"state"}),
        "engine": engine.model_dump(mode="json") if engine else None,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def service_key(spec: interfaces.ReplicaSpec) -> str:
    """What a replica serves, where it runs left out (its devices, and the room the engine is
    told it has there): two specs with one key answer every task alike."""
    options = {k: v for k, v in spec.options.items() if k != "vram_total_mib"}
    material = [
        spec.engine,
        spec.model_id,
        spec.model_ref,
        spec.model_digest,
        spec.model_size_mib,
        spec.ctx,
        spec.slots,
        list(spec.flags),
        dict(spec.env),
        options,
    ]
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


def engine_room_mib(
    snapshot: observed.GpuSnapshot | None, devices: Iterable[int]
) -> dict[str, int]:
    """Per device (as a string key, for engine options): the VRAM an engine may use."""
    totals = {}
    for g in snapshot.gpus if snapshot else ():
        outside = max(0, g.vram_used_mib - sum(p.used_mib for p in g.processes))
        totals[g.index] = g.vram_total_mib - outside
    return {str(i): totals.get(i, 0) for i in devices}


def replica_spec(
    pool: desired.PoolSpec,
    state: desired.DesiredState,
    *,
    replica_id: str,
    devices: tuple[int, ...],
    model_path: Path | None,
    file_size_mib: int | None,
    snapshot: observed.GpuSnapshot | None,
    state_dir: Path,
) -> interfaces.ReplicaSpec:
    """Everything an engine needs to start one replica of `pool` on `devices`."""
    model = state.models[pool.model]
    options: dict[str, Any] = pool.sim.model_dump(mode="json") if pool.sim else {}
    engine_cfg = state.engines.get(pool.engine)
    if engine_cfg is not None:
        options["engine"] = engine_cfg.model_dump(mode="json")
    options["vram_total_mib"] = engine_room_mib(snapshot, devices)
    return interfaces.ReplicaSpec(
        replica_id=replica_id,
        pool_id=pool.id,
        engine=pool.engine,
        model_id=pool.model,
        model_ref=model.ref,
        model_path=model_path,
        model_size_mib=model.size_mib or file_size_mib or DEFAULT_MODEL_MIB,
        model_digest=model.digest,
        devices=devices,
        ctx=pool.ctx,
        slots=pool.slots,
        spec_hash=spec_hash(pool, model, engine_cfg),
        state_dir=state_dir,
        flags=tuple(pool.flags),
        env=dict(pool.env),
        options=options,
    )


@dataclass(frozen=True)
class Loading:
    """A replica that holds (or will hold) VRAM: its devices, estimate and process id."""

    devices: tuple[int, ...]
    vram_mib: int
    pid: int | None


def measured_mib(snapshot: observed.GpuSnapshot | None) -> dict[tuple[int, int], int]:
    """NVML's per-process VRAM, by (GPU index, pid)."""
    return {
        (gpu.index, proc.pid): proc.used_mib
        for gpu in (snapshot.gpus if snapshot else ())
        for proc in gpu.processes
    }


def measured_by_pid(snapshot: observed.GpuSnapshot | None) -> dict[int, int]:
    """NVML's per-process VRAM summed over the GPUs, by pid (a replica's whole use)."""
    total: dict[int, int] = {}
    for (_, pid), mib in measured_mib(snapshot).items():
        total[pid] = total.get(pid, 0) + mib
    return total


def vram_off(estimated_mib: int, measured_mib: int | None) -> float | None:
    """How far the measure is from the estimate ((measured − estimated) / estimated) when more
    than VRAM_TOLERANCE either way; None when close enough or not measured."""
    if measured_mib is None or estimated_mib <= 0:
        return None
    off = (measured_mib - estimated_mib) / estimated_mib
    return off if abs(off) > VRAM_TOLERANCE else None


def gpu_rooms(
    snapshot: observed.GpuSnapshot | None, loading: Iterable[Loading]
) -> list[planning.GpuRoom]:
    """Free VRAM per GPU, less what replicas still loading will take (not yet measured)."""
    if snapshot is None:
        return []
    measured = measured_mib(snapshot)
    pending: dict[int, int] = {}
    for replica in loading:
        share = planning.share_mib(replica.vram_mib, len(replica.devices))
        for index in replica.devices:
            held = measured.get((index, replica.pid), 0) if replica.pid is not None else 0
            pending[index] = pending.get(index, 0) + max(0, share - held)
    return [
        planning.GpuRoom(
            index=g.index,
            total_mib=g.vram_total_mib,
            free_mib=max(0, g.vram_free_mib - pending.get(g.index, 0)),
        )
        for g in snapshot.gpus
    ]  # a GPU with a failed reading still counts


def gpu_free_mib(snapshot: observed.GpuSnapshot | None, devices: tuple[int, ...]) -> int:
    """The least free VRAM among `devices` (placement's headroom measure)."""
    if snapshot is None:
        return 0
    return min((g.vram_free_mib for g in snapshot.gpus if g.index in devices), default=0)


@dataclass(frozen=True)
class ReplicaBrief:
    replica_id: str
    state: statusfile.ReplicaState
    last_error: str | None
    restarts: int = 0  # 0 when Failed: given up at once (restarting could not fix it)


def pool_condition(
    pool: desired.PoolSpec,
    replicas: list[ReplicaBrief],
    *,
    problem: str | None,
    unschedulable: planning.Unschedulable | None,
    waiting: bool,
    drained: str | None = None,
    downloading: str | None = None,
    retired: bool = False,
) -> tuple[statusfile.PoolState, str | None]:
    """A pool's state and the reason shown beside it, from its replicas and what planning
    said about it. Ready with a reason means serving while converging, or degraded: some
    replicas serve and the others cannot be placed. A drained pool (`drained`: why) is
    Stopped, whatever its replicas are still doing, as is a pool of a Retired model (`retired`:
    unloaded). A pool whose model file is still
    downloading is Progressing with the percent done."""
    if problem is not None:
        return "Failed", problem
    if retired:
        return "Stopped", (
            f"model {pool.model} is Retired in orch.yaml: its replicas are unloaded; "
            "set its state: Active to serve it again"
        )
    if drained is not None:
        return "Stopped", drained
    if downloading is not None:
        return "Progressing", downloading
    if pool.replicas == 0:
        return "Stopped", "replicas: 0 in orch.yaml; raise it to serve this pool"
    ready = [r for r in replicas if r.state == "Ready"]
    if unschedulable is not None:
        why = f"{unschedulable.message}. {fit_hint(pool, unschedulable)}"
        if unschedulable.kept and ready:  # moved where it cannot go: serving where it was
            return "Ready", (
                f"serving as before on {', '.join(unschedulable.kept)}, where it ran until "
                f"orch.yaml moved it: the new placement cannot be met: {why}"
            )
        if ready:
            return "Ready", f"degraded: {len(ready)} of {pool.replicas} replicas Ready; {why}"
        return "Unschedulable", why
    failed = [r for r in replicas if r.state == "Failed"]
    if pool.replicas > 0 and failed and len(failed) == len(replicas) and not ready:
        why = failed[0].last_error or f"replica {failed[0].replica_id} failed"
        given_up = (
            "it failed too often to be restarted (circuit breaker open)"
            if any(r.restarts for r in failed)
            else "it is not restarted, as restarting cannot fix this"
        )
        return "Failed", (
            f"{why}; {given_up}: fix the cause, then POST /v1/pools/{pool.id}/reload (or edit "
            "the pool in orch.yaml) to start it again"
        )
    if len(ready) >= pool.replicas and len(ready) == len(replicas):
        return "Ready", None
    if waiting:
        return "Progressing", "waiting for VRAM that draining replicas will free"
    busy = [r for r in replicas if r.state != "Ready"]
    why = ", ".join(f"{r.replica_id} {r.state}" for r in busy) or "starting replicas"
    if ready and busy:
        return "Ready", why
    return "Progressing", why


def fit_hint(pool: desired.PoolSpec, unschedulable: planning.Unschedulable) -> str:
    """What to change so a replica fits: the knobs that size its VRAM, and the room there is."""
    room = unschedulable.best_free_mib
    elsewhere = unschedulable.fits_on
    move = ""
    if elsewhere:
        gpus = " and ".join(f"GPU {i}" for i in elsewhere)
        move = (
            f"{gpus} {'has' if len(elsewhere) == 1 else 'have'} room for a replica: set "
            f"devices: auto (or [{elsewhere[0]}]), or, to fit where it is pinned: "
        )
    # only llama-server reads flags: a sim pool's footprint has no KV cache type to change
    kv = (
        "quantize the KV cache (flags: [-ctk, q8_0, -ctv, q8_0]), "
        if pool.engine == "llamacpp"
        else ""
    )
    return (move or "To fit: ") + (
        f"lower ctx ({pool.ctx}) or slots ({pool.slots}), {kv}use a smaller model or "
        f"quantization, or fewer replicas; a replica must fit in {room} MiB"
    )
