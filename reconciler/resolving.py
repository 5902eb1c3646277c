"""What each pool of orch.yaml wants, with its model file resolved: the pool runtime's first
step of every pass, and the spec a started or adopted replica runs with.

`wants(runtime, state)` goes through the pools in order and turns each into a
`planning.PoolWant`, or into a problem shown on the pool (engine not installed, no resolver
for the ref's scheme, model file missing) or a download it waits for (shown Progressing, or
Failed when the download failed); a drained pool wants no replica while its spec is the one
drained. `spec_for` resolves the model ref through the resolver plugins and asks `specs` for the
replica spec; `pools`, `booting` and `adoption` call it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from plugins import interfaces
from reconciler import fetching, planning, specs
from state import desired, ids

if TYPE_CHECKING:
    from reconciler import pools


def scheme_of(ref: str) -> str:
    """The resolver a model ref names: the part before the colon, `file` when there is none."""
    return ref.split(":", 1)[0] if ":" in ref else "file"


def spec_for(
    runtime: pools.PoolRuntime,
    pool: desired.PoolSpec,
    state: desired.DesiredState,
    replica_id: str,
    devices: tuple[int, ...],
) -> interfaces.ReplicaSpec:
    ref = state.models[pool.model].ref
    resolver = runtime.plugins.resolvers.get(scheme_of(ref))
    found = resolver(ref, runtime.config.base) if resolver else None
    return specs.replica_spec(
        pool,
        state,
        replica_id=replica_id,
        devices=devices,
        model_path=found.path if found else None,
        file_size_mib=found.size_mib if found else None,
        snapshot=runtime.last_snapshot,
        state_dir=runtime.state_dir,
    )


def want(
    runtime: pools.PoolRuntime, pool: desired.PoolSpec, state: desired.DesiredState
) -> planning.PoolWant:
    engine = runtime.plugins.engines[pool.engine]
    probe = spec_for(
        runtime,
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
        service_key=specs.service_key(probe),
    )


def wants(runtime: pools.PoolRuntime, state: desired.DesiredState) -> list[planning.PoolWant]:
    """The want of every pool that can be planned now; the others get their problem (or
    their download) recorded on the runtime, and downloads no pool waits for any more are
    let go."""
    out = []
    fetched: set[fetching.Key] = set()  # the downloads a pool still waits for
    for pool in state.pools:
        if pool.engine not in runtime.plugins.engines:
            runtime.problems[pool.id] = f"engine {pool.engine!r} is not installed"
            continue
        ref = state.models[pool.model].ref
        scheme = scheme_of(ref)
        if scheme not in runtime.plugins.resolvers:
            known = ", ".join(f"{k}:" for k in sorted(runtime.plugins.resolvers))
            runtime.problems[pool.id] = (
                f"no model resolver for {scheme}: refs (installed: {known}); "
                "download the file and use a file: ref"
            )
            continue
        if not _model_file_at_hand(runtime, pool, state, scheme):
            fetched.add((ref, state.models[pool.model].digest))
            continue
        missing = _missing_model_file(runtime, pool, state)
        if missing is not None:
            runtime.problems[pool.id] = missing
            continue
        runtime.problems.pop(pool.id, None)
        wanted = want(runtime, pool, state)
        drain = runtime.drained.get(pool.id)
        if state.models[pool.model].state == "Retired":  # retiring a model unloads its pools
            wanted = dataclasses.replace(wanted, replicas=0)
        elif drain is not None and drain.spec_hash == wanted.spec_hash:
            wanted = dataclasses.replace(wanted, replicas=0)  # drained: serve nothing
        elif drain is not None and not _reloading(runtime, pool):
            # (a reload lifts the drain itself once it succeeds, and keeps it if it fails)
            runtime.undrain(pool.id, "its config changed")
        out.append(wanted)
    runtime.fetches.keep(fetched)
    return out


def _reloading(runtime: pools.PoolRuntime, pool: desired.PoolSpec) -> bool:
    """Whether a reload under way may have changed `pool`'s spec: its own, or one of
    another pool of its model (a new model_ref is every such pool's): put back if the
    reload fails, so its drain is not lifted for it until the outcome is known."""
    return pool.id in runtime.reloading or pool.model in runtime.reloading.values()


def _missing_model_file(
    runtime: pools.PoolRuntime, pool: desired.PoolSpec, state: desired.DesiredState
) -> str | None:
    """Why the pool cannot start for want of its model file (engines that load a file
    only; an estimate of a file that is not there would only mislead)."""
    if not getattr(runtime.plugins.engines[pool.engine], "needs_model_file", True):
        return None
    ref = state.models[pool.model].ref
    found = runtime.plugins.resolvers[scheme_of(ref)](ref, runtime.config.base)
    if found.path is None or found.path.is_file():
        return None
    return (
        f"model {pool.model!r}: file {found.path} does not exist (file: paths resolve "
        f"from {runtime.config.base}); put the file there or fix models.{pool.model}.ref"
    )


def _model_file_at_hand(
    runtime: pools.PoolRuntime, pool: desired.PoolSpec, state: desired.DesiredState, scheme: str
) -> bool:
    """False while the pool waits for its model's download (shown Progressing) or the
    download failed (Failed); engines that never read the file do not wait."""
    runtime.downloading.pop(pool.id, None)
    resolver = runtime.plugins.resolvers[scheme]
    engine = runtime.plugins.engines[pool.engine]
    if not getattr(resolver, "downloadable", False) or not getattr(
        engine, "needs_model_file", True
    ):
        return True
    need = runtime.fetches.need(pool.model, state.models[pool.model], resolver, runtime.config.base)
    if need.state == "failed":
        runtime.problems[pool.id] = need.message or "the model cannot be downloaded"
    elif need.state == "progressing":
        runtime.problems.pop(pool.id, None)
        runtime.downloading[pool.id] = need.message or "downloading the model"
    return need.state == "ready"
