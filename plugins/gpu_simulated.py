"""The simulated GPU observer: a workstation's GPUs described in an inventory file.

Used by `orchctl serve --simulate <inventory.yaml>`, the examples and the tests, so the whole
orchestrator runs on a machine without NVIDIA hardware. The daemon gets it from the
`simulated` factory registered by `plugin` (hook `orch_register_gpu_observers`).

Every GPU is marked `simulated=True` and its name starts with "SIMULATED ", so no screen or
log can pass it off as real hardware. Memory use is the inventory's `vram_used_mib` plus the
bookings that simulated engine processes write while they run (`plugins.sim_bookings` has
their files, shared with the sim child). A booking counts only while its process is alive
(`plugins.liveness.running`: a zombie is dead), so a crashed engine frees its memory the way a
real one does. Here each booking is also checked against the `Booking` model, and a broken one
is reported in the snapshot's errors rather than silently skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic

from plugins import hookspecs, interfaces, liveness, sim_bookings
from state import desired, loading, observed

PREFIX = "SIMULATED "


class InventoryError(interfaces.ConfigProblem):
    """The inventory file cannot be used; `errors` say where and why (a config error)."""

    def __init__(self, path: Path, errors: list[loading.LoadError]) -> None:
        lines = "\n".join(f"  {e}" for e in errors)
        super().__init__(f"the simulated GPU inventory {path} cannot be used:\n{lines}")
        self.path = path
        self.errors = errors


class Booking(desired.Strict):
    """VRAM a simulated engine process holds on one simulated GPU."""

    pid: int = pydantic.Field(ge=1)
    used_mib: int = pydantic.Field(ge=0)
    replica_id: str


def write_booking(state_dir: Path, gpu_index: int, booking: Booking) -> Path:
    """Write a checked booking the way a sim replica does (atomic: never half-read)."""
    return sim_bookings.write(
        state_dir,
        gpu_index,
        pid=booking.pid,
        used_mib=booking.used_mib,
        replica_id=booking.replica_id,
    )


def remove_booking(state_dir: Path, gpu_index: int, pid: int) -> None:
    sim_bookings.remove(state_dir, gpu_index, pid)


def load_inventory(path: Path) -> desired.SimulatedInventory:
    """Load and check an inventory; raise InventoryError listing every problem found."""
    loaded = loading.load_model(path, desired.SimulatedInventory)
    if loaded.value is None:
        raise InventoryError(path, loaded.errors)
    inventory = loaded.value
    errors = []
    node = loaded.node
    if not inventory.gpus:
        line, col = loading.locate(node, ("gpus",))  # the empty list, or the file's start
        errors.append(
            loading.LoadError(
                str(path),
                line,
                col,
                "gpus",
                "lists no GPUs",
                "add at least one GPU with index, name, uuid and vram_total_mib",
            )
        )
    seen: dict[int, int] = {}
    for i, gpu in enumerate(inventory.gpus):
        if gpu.index in seen:
            line, col = loading.locate(node, ("gpus", i, "index"))
            errors.append(
                loading.LoadError(
                    str(path),
                    line,
                    col,
                    f"gpus[{i}].index",
                    f"GPU index {gpu.index} is already used by gpus[{seen[gpu.index]}]",
                    "give every GPU its own index, as nvidia-smi numbers them",
                )
            )
        seen.setdefault(gpu.index, i)
        if gpu.vram_used_mib > gpu.vram_total_mib:
            line, col = loading.locate(node, ("gpus", i, "vram_used_mib"))
            errors.append(
                loading.LoadError(
                    str(path),
                    line,
                    col,
                    f"gpus[{i}].vram_used_mib",
                    f"{gpu.vram_used_mib} MiB used is more than the {gpu.vram_total_mib} MiB total",
                    "lower vram_used_mib (what other programs hold) below vram_total_mib",
                )
            )
    if errors:
        raise InventoryError(path, errors)
    return inventory


class SimulatedObserver:
    """A GpuObserver over an inventory and the bookings of live simulated engines."""

    name = "simulated"
    simulated = True

    def __init__(
        self,
        inventory: desired.SimulatedInventory,
        *,
        state_dir: Path,
        is_alive: Callable[[int], bool] = liveness.running,
    ) -> None:
        self._gpus = sorted(inventory.gpus, key=lambda g: g.index)
        self._state_dir = state_dir
        self._is_alive = is_alive

    def observe(self) -> observed.GpuSnapshot:
        errors: list[str] = []
        gpus = tuple(self._observe_one(gpu, errors) for gpu in self._gpus)
        return observed.GpuSnapshot(gpus=gpus, simulated=True, errors=tuple(errors))

    def close(self) -> None:
        pass

    def _observe_one(self, gpu: desired.SimulatedGpu, errors: list[str]) -> observed.Gpu:
        bookings = self._bookings(gpu.index, errors)
        used = gpu.vram_used_mib + sum(b.used_mib for b in bookings)
        error = None
        if used > gpu.vram_total_mib:
            # a real GPU would have refused the allocation; say so rather than hide it
            holders = ", ".join(b.replica_id for b in bookings)
            error = (
                f"bookings need {used} MiB, more than the {gpu.vram_total_mib} MiB this "
                f"GPU has (held by {holders}): a real GPU would be out of memory"
            )
            errors.append(f"simulated GPU {gpu.index}: {error}")
            used = gpu.vram_total_mib
        name = gpu.name if gpu.name.startswith(PREFIX) else PREFIX + gpu.name
        return observed.Gpu(
            index=gpu.index,
            uuid=gpu.uuid,
            name=name,
            vram_total_mib=gpu.vram_total_mib,
            vram_used_mib=used,
            vram_free_mib=gpu.vram_total_mib - used,
            utilization_pct=gpu.utilization_pct,
            temperature_c=gpu.temperature_c,
            processes=tuple(observed.GpuProcess(pid=b.pid, used_mib=b.used_mib) for b in bookings),
            simulated=True,
            error=error,
        )

    def _bookings(self, index: int, errors: list[str]) -> list[Booking]:
        folder = sim_bookings.folder(self._state_dir, index)
        try:
            found = sim_bookings.entries(folder)
        except OSError as exc:
            errors.append(f"simulated GPU {index}: cannot list {folder}: {exc.strerror or exc}")
            return []
        out = []
        for pid, path in found:
            try:
                booking = Booking.model_validate_json(path.read_bytes())
            except FileNotFoundError:  # the engine removed it as we listed
                continue
            except (OSError, pydantic.ValidationError) as exc:
                errors.append(
                    f"simulated GPU {index}: booking {path} is unreadable: {_first_line(exc)}"
                )
                continue
            if booking.pid != pid:
                errors.append(
                    f"simulated GPU {index}: booking {path} names pid {booking.pid}, "
                    "not the pid in its file name; ignored"
                )
                continue
            if self._is_alive(booking.pid):
                out.append(booking)
            else:  # a dead process holds no VRAM; its pid reused, the booking would count again
                with contextlib.suppress(OSError):
                    path.unlink()
        return out


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_simulated(config: desired.DesiredState, base: Path) -> SimulatedObserver:
    """The factory: inventory and state folder are resolved against the config's folder."""
    if not config.gpus.inventory:
        raise InventoryError(
            base,
            [
                loading.LoadError(
                    str(base),
                    None,
                    None,
                    "gpus.inventory",
                    "the simulated observer needs an inventory file",
                    "set gpus.inventory, or run `orchctl serve --simulate <inventory.yaml>`",
                )
            ],
        )
    inventory = load_inventory(desired.resolve(base, config.gpus.inventory))
    return SimulatedObserver(inventory, state_dir=desired.resolve(base, config.paths.state))


def _factory(config: desired.DesiredState, base: Path) -> interfaces.GpuObserver:
    return open_simulated(config, base)


class _SimulatedPlugin:
    @hookspecs.hookimpl
    def orch_register_gpu_observers(self, register: Callable[[str, Any], None]) -> None:
        register("simulated", _factory)


plugin = _SimulatedPlugin()
