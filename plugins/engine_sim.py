"""The `sim` engine: replicas are `plugins.sim_server` children on simulated GPUs (demo, CI).

The launcher is here; the protocol client and lifecycle steps are the llama-server ones
(`plugins.llama_server`), so every sim run exercises the code path real GPUs use.

`ReplicaSpec.options` for sim: the fields of `state.desired.SimOptions` (tokens_per_s, load_s,
first_token_ms, first_request_extra_ms, faults), plus optionally `vram_total_mib` (see
`vram_totals`): the room llama-orch may use on each GPU of the mask. With it, a replica whose
footprint does not fit beside the live bookings fails to load with a CUDA-style out-of-memory
error, as llama-server would. `engine.env` (engines.sim.env) and the pool's env reach the
child, LLAMA_ARG_* excepted.

VRAM: `estimate_vram_mib` is `sim_bookings.footprint_mib`, the same formula the child books:
model_size_mib + ceil(ctx × slots × 0.0625 MiB) + 700 MiB.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pydantic

from plugins import hookspecs, interfaces, liveness, llama_server, processes, sim_bookings
from state import desired

_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def sim_options(options: Mapping[str, Any]) -> desired.SimOptions:
    """The SimOptions part of a spec's options, validated; EngineStartError when invalid."""
    fields = desired.SimOptions.model_fields
    try:
        return desired.SimOptions.model_validate({k: v for k, v in options.items() if k in fields})
    except pydantic.ValidationError as e:
        raise interfaces.EngineStartError(f"invalid sim options: {e}") from e


def command(spec: interfaces.ReplicaSpec, *, port: int) -> list[str]:
    """The child's argv. `-S` skips site-packages: the child needs the standard library only."""
    argv = [
        sys.executable,
        "-S",
        "-m",
        "plugins.sim_server",
        "--port",
        str(port),
        "--replica-id",
        spec.replica_id,
        "--model",
        spec.model_id,
        "--model-size-mib",
        str(spec.model_size_mib),
        "--ctx",
        str(spec.ctx),
        "--slots",
        str(spec.slots),
        "--gpu",
        ",".join(str(d) for d in spec.devices),
        "--state-dir",
        str(spec.state_dir),
        "--options-json",
        sim_options(spec.options).model_dump_json(),
    ]
    totals = vram_totals(spec)
    if totals is not None:
        argv += ["--vram-total-mib", ",".join(str(t) for t in totals)]
    return argv


def vram_totals(spec: interfaces.ReplicaSpec) -> list[int] | None:
    """Room per device of the mask from options `vram_total_mib`: an int for every device, a
    list in mask order, or a mapping by device index. None (no check) when any is unknown
    or not positive."""
    raw = spec.options.get("vram_total_mib")
    if isinstance(raw, Mapping):
        values = [raw.get(str(d), raw.get(d)) for d in spec.devices]
    elif isinstance(raw, list | tuple):
        values = list(raw)
    else:
        values = [raw] * len(spec.devices)
    if len(values) != len(spec.devices) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        return None
    return [int(v) for v in values]


def child_env(spec: interfaces.ReplicaSpec, base: Mapping[str, str]) -> dict[str, str]:
    engine_env = (spec.options.get("engine") or {}).get("env") or {}
    env = processes.scrub_env({**base, **engine_env, **spec.env})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), base.get("PYTHONPATH", "")) if p
    )
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in spec.devices)
    return env


def bookings(spec: interfaces.ReplicaSpec, pid: int) -> list[Path]:
    return [sim_bookings.path_for(spec.state_dir, gpu, pid) for gpu in spec.devices]


def _booked_mib(handle: interfaces.ReplicaHandle) -> int | None:
    found = [sim_bookings.used_mib(path) for path in bookings(handle.spec, handle.pid)]
    mibs = [mib for mib in found if mib is not None]
    return sum(mibs) if mibs else None


def _forget_bookings(spec: interfaces.ReplicaSpec, pid: int) -> None:
    """A child killed by SIGKILL (or dead by a fault) cannot remove its own bookings."""
    for gpu in spec.devices:
        sim_bookings.remove(spec.state_dir, gpu, pid)


class SimEngine(llama_server.ServerEngine):
    name = "sim"
    needs_model_file = False  # simulates the model from size_mib; no file is read
    adopt_stop_grace_s = 5.0

    def estimate_vram_mib(self, spec: interfaces.ReplicaSpec) -> int:
        return sim_bookings.footprint_mib(spec.model_size_mib, spec.ctx, spec.slots)

    async def start(self, spec: interfaces.ReplicaSpec) -> interfaces.ReplicaHandle:
        port = processes.free_port()
        return await processes.launch(
            spec, argv=command(spec, port=port), env=child_env(spec, os.environ), port=port
        )

    async def describe(self, handle: interfaces.ReplicaHandle) -> interfaces.EngineInfo:
        return await llama_server.describe(handle, vram_measured_mib=_booked_mib(handle))

    def poll_exit(self, handle: interfaces.ReplicaHandle) -> interfaces.ExitInfo | None:
        ended = super().poll_exit(handle)
        if ended is not None:
            _forget_bookings(handle.spec, handle.pid)
        return ended

    async def stop(
        self, handle: interfaces.ReplicaHandle, *, grace_s: float
    ) -> interfaces.ExitInfo:
        ended = await super().stop(handle, grace_s=grace_s)
        _forget_bookings(handle.spec, handle.pid)
        return ended

    async def adopt(
        self, record: Mapping[str, Any], spec: interfaces.ReplicaSpec
    ) -> interfaces.ReplicaHandle | None:
        handle = await super().adopt(record, spec)
        pid = record.get("pid")
        if handle is None and isinstance(pid, int) and not liveness.running(pid):
            _forget_bookings(spec, pid)  # its process is gone (or a zombie): so is its VRAM
        return handle


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("sim", SimEngine())


plugin = _Plugin()
