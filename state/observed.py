"""Plain data describing the observed world: GPUs and the processes on them.

GPU observers (plugins) produce these; planning and placement consume them. Frozen, so a
snapshot taken at the start of a reconcile pass cannot change under it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: int


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    vram_total_mib: int
    vram_used_mib: int
    vram_free_mib: int
    pci_bus_id: str = ""
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_mw: int | None = None
    mig_enabled: bool = False
    processes: tuple[GpuProcess, ...] = ()
    simulated: bool = False
    error: str | None = None  # the GPU answered an NVML call with an error (reported, not fatal)


@dataclass(frozen=True)
class GpuSnapshot:
    gpus: tuple[Gpu, ...]
    simulated: bool
    errors: tuple[str, ...] = field(default=())

    def by_index(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)
