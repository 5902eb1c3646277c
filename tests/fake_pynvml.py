"""A fake `pynvml` module built from readings recorded on real hardware.

Tests of the NVML observer pass an instance where the real module would go. The functions
have the real names and return the real shapes (names and uuids as str, `busId` as bytes,
memory in bytes, MIG mode as `[current, pending]`), and errors are the real `pynvml` error
classes, so the observer cannot tell the difference. Knobs add GPUs and processes and make
calls fail, GPUs get lost, or the library go missing.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

FIXTURE = Path("/work/shared/fixtures/nvml/h200-idle.json")
if not FIXTURE.exists():  # a checkout that carries the shared folder next to the repository
    FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/nvml/h200-idle.json"

# The real error classes, so names, hierarchy and messages are exactly pynvml's.
NVMLError = pynvml.NVMLError
NVMLError_Uninitialized = pynvml.NVMLError_Uninitialized
NVMLError_NotSupported = pynvml.NVMLError_NotSupported
NVMLError_NoPermission = pynvml.NVMLError_NoPermission
NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
NVMLError_InvalidArgument = pynvml.NVMLError_InvalidArgument
NVMLError_LibRmVersionMismatch = pynvml.NVMLError_LibRmVersionMismatch
NVMLError_Unknown = pynvml.NVMLError_Unknown
NVMLError_Timeout = pynvml.NVMLError_Timeout

NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE


class _Handle:
    """Opaque, like the real `c_nvmlDevice_t`."""

    def __init__(self, index: int) -> None:
        self._index = index


class FakeNvml:
    """Stands in for the `pynvml` module. `FakeNvml()` is the recorded idle H200."""

    def __init__(self, fixture: Path = FIXTURE) -> None:
        recorded = json.loads(fixture.read_text(encoding="utf-8"))
        self.driver: str = recorded["driver"]
        self.cuda: int = recorded["cuda"]  # 13000 is CUDA 13.0
        self.gpus: list[dict[str, Any]] = [dict(g) for g in recorded["gpus"]]
        self.init_error: type[Exception] | None = None
        self.count_error: type[Exception] | None = None
        self.failing: dict[tuple[int, str], type[Exception]] = {}
        self.lost: set[int] = set()
        self.lost_handles: set[int] = set()
        self.initialised = 0
        self.shutdowns = 0
        # the module's constants and error classes, reachable as attributes like the real one
        for name, value in globals().items():
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, value)

    # -- knobs -------------------------------------------------------------------------------

    def library_missing(self) -> FakeNvml:
        self.init_error = NVMLError_LibraryNotFound
        return self

    def add_gpu(self, **readings: Any) -> dict[str, Any]:
        """A copy of the recorded GPU at the next index, with `readings` replaced."""
        gpu = copy.deepcopy(self.gpus[0])
        index = len(self.gpus)
        gpu.update(
            index=index,
            uuid=f"GPU-fake-{index:04d}",
            pci=f"00000000:00:{6 + index:02X}.0",
            procs=[],
        )
        gpu.update(readings)
        self.gpus.append(gpu)
        return gpu

    def add_process(self, index: int, pid: int, used_bytes: int | None) -> None:
        """A compute process; device memory used rises by what it uses, as observed."""
        gpu = self.gpus[index]
        gpu["procs"].append({"pid": pid, "usedGpuMemory": used_bytes})
        if used_bytes:
            gpu["mem_used"] += used_bytes
            gpu["mem_free"] -= used_bytes

    def fail(self, index: int, function: str, error: type[Exception] = NVMLError_Unknown) -> None:
        """Make `function` (e.g. "nvmlDeviceGetPowerUsage") raise `error` for GPU `index`."""
        self.failing[(index, function)] = error

    def lose(self, index: int, *, handle_too: bool = False) -> None:
        """The GPU falls off the bus: every call about it raises NVMLError_GpuIsLost."""
        self.lost.add(index)
        if handle_too:
            self.lost_handles.add(index)

    # -- the module's functions --------------------------------------------------------------

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check_init()
        self.initialised -= 1
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check_init()
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check_init()
        return int(self.cuda)

    def nvmlDeviceGetCount(self) -> int:
        self._check_init()
        if self.count_error is not None:
            raise self.count_error()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check_init()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        if index in self.lost_handles:
            raise NVMLError_GpuIsLost()
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return str(self._gpu(handle, "nvmlDeviceGetName")["name"])

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return str(self._gpu(handle, "nvmlDeviceGetUUID")["uuid"])

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=gpu["pci"].encode(), busIdLegacy=gpu["pci"].encode())

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu["mem_total"], used=gpu["mem_used"], free=gpu["mem_free"])

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu["util"], memory=0)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._gpu(handle, "nvmlDeviceGetTemperature")
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return int(gpu["temp"])

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetPowerUsage")["power_mw"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [
            SimpleNamespace(
                pid=p["pid"],
                usedGpuMemory=p["usedGpuMemory"],
                gpuInstanceId=0xFFFFFFFF,
                computeInstanceId=0xFFFFFFFF,
            )
            for p in gpu["procs"]
        ]

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        major, minor = self._gpu(handle, "nvmlDeviceGetCudaComputeCapability")["cc"]
        return int(major), int(minor)

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        return list(self._gpu(handle, "nvmlDeviceGetMigMode")["mig"])

    def nvmlDeviceGetPersistenceMode(self, handle: _Handle) -> int:
        return int(self._gpu(handle, "nvmlDeviceGetPersistenceMode")["persistence"])

    # -- internals ---------------------------------------------------------------------------

    def _check_init(self) -> None:
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()

    def _gpu(self, handle: _Handle, function: str) -> dict[str, Any]:
        self._check_init()
        index = handle._index
        if index in self.lost:
            raise NVMLError_GpuIsLost()
        error = self.failing.get((index, function))
        if error is not None:
            raise error()
        return self.gpus[index]
