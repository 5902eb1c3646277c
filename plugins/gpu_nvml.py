"""The NVML GPU observer: reads the real GPUs through nvidia-ml-py (module `pynvml`).

The daemon gets it from the `nvml` factory registered by `plugin` (hook
`orch_register_gpu_observers`) and calls `observe()` every `gpus.poll_s`; `orchctl doctor`
calls `open_nvml()` to explain a missing driver and `read_facts()` for the driver's CUDA
version and each GPU's compute capability (which the provisioner builds for). Every NVML call
is guarded: an error on one GPU or one reading is reported in `Gpu.error` and
`GpuSnapshot.errors`, never raised. Only
`open_nvml` raises, with `EnvironmentMissing`, when there is no driver or no GPU at all.

The `pynvml` module is a parameter so tests pass a fake built from recorded readings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from plugins import hookspecs, interfaces
from state import desired, observed

T = TypeVar("T")
MIB = 1024 * 1024

SIMULATE_HINT = (
    "To try llama-orch home without a GPU, run the simulated workstation instead, in a new\n"
    "folder:\n"
    "    orchctl init --simulate && orchctl serve"
)
DRIVER_FIX = (
    "Install the NVIDIA driver (it provides libnvidia-ml.so.1, which NVML needs), then reboot:\n"
    "  Arch / CachyOS:   sudo pacman -S nvidia-open nvidia-utils\n"
    "                    (or, for GTX 10xx and older: sudo pacman -S nvidia nvidia-utils)\n"
    "  Debian / Ubuntu:  sudo ubuntu-drivers install\n"
    "                    (or: sudo apt install nvidia-driver   # Debian, from non-free)\n"
    "  then:             sudo reboot\n"
    "Check it worked:    nvidia-smi   (it should list every GPU)\n"
)

# Readings a GPU may legitimately not offer (MIG on GeForce cards, power on some boards):
# they are left empty without an error.
_QUIET_ERRORS = ("NVMLError_NotSupported", "NVMLError_FunctionNotFound")
# The GPU itself is gone: stop asking it anything this round.
_LOST_ERRORS = ("NVMLError_GpuIsLost", "NVMLError_GpuNotFound", "NVMLError_ResetRequired")


def open_nvml(nvml: Any = None) -> NvmlObserver:
    """Initialise NVML and return an observer; raise EnvironmentMissing when it cannot work.

    `nvml` is the `pynvml` module (default: the installed one).
    """
    if nvml is None:
        try:
            import pynvml
        except ImportError as exc:
            raise interfaces.EnvironmentMissing(
                f"the Python package nvidia-ml-py is not installed ({exc})",
                "Install it in the environment llama-orch home runs in:\n"
                "    pip install nvidia-ml-py\n" + SIMULATE_HINT,
            ) from exc
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise _init_failure(nvml, exc) from exc
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        _shutdown_quietly(nvml)
        raise interfaces.EnvironmentMissing(
            f"NVML started but cannot count the GPUs: {exc}",
            "Check the driver with `nvidia-smi`; a reboot after a driver update usually "
            "fixes this.\n" + SIMULATE_HINT,
        ) from exc
    if count == 0:
        _shutdown_quietly(nvml)
        raise interfaces.EnvironmentMissing(
            "the NVIDIA driver is loaded but reports no GPUs",
            "Check that the cards are seated and powered and that `nvidia-smi` lists them;\n"
            "in a container, pass the GPUs in (e.g. `docker run --gpus all`).\n" + SIMULATE_HINT,
        )
    return NvmlObserver(nvml)


def _init_failure(nvml: Any, exc: BaseException) -> interfaces.EnvironmentMissing:
    kind = type(exc).__name__
    if kind == "NVMLError_LibraryNotFound":
        what = "the NVIDIA driver is not installed: NVML (libnvidia-ml.so.1) was not found"
        return interfaces.EnvironmentMissing(what, DRIVER_FIX + SIMULATE_HINT)
    if kind == "NVMLError_DriverNotLoaded":
        what = "the NVIDIA driver is installed but its kernel module is not loaded"
        fix = (
            "Reboot after installing or updating the driver. If it is still not loaded, check\n"
            "`lsmod | grep nvidia` and `sudo dmesg | grep -i nvidia` (Secure Boot can block the\n"
            "module; nouveau must not be loaded). If the driver is missing:\n" + DRIVER_FIX
        )
        return interfaces.EnvironmentMissing(what, fix + SIMULATE_HINT)
    if kind == "NVMLError_LibRmVersionMismatch":
        what = "the NVIDIA driver library and kernel module have different versions"
        fix = "This happens after a driver update until the next boot: sudo reboot\n"
        return interfaces.EnvironmentMissing(what, fix + SIMULATE_HINT)
    if kind == "NVMLError_NoPermission":
        what = "NVML refused access to the GPUs (insufficient permissions)"
        fix = "Check the permissions of /dev/nvidia* (`ls -l /dev/nvidia*`) and `nvidia-smi`.\n"
        return interfaces.EnvironmentMissing(what, fix + SIMULATE_HINT)
    what = f"NVML could not start: {exc} ({kind})"
    fix = "Check the driver with `nvidia-smi`; if it fails too, reinstall the driver:\n"
    return interfaces.EnvironmentMissing(what, fix + DRIVER_FIX + SIMULATE_HINT)


def _shutdown_quietly(nvml: Any) -> None:
    with contextlib.suppress(nvml.NVMLError):
        nvml.nvmlShutdown()


@dataclass(frozen=True)
class _Identity:
    uuid: str
    name: str
    pci_bus_id: str
    total_mib: int


class _GpuLost(Exception):
    pass


class NvmlObserver:
    """A GpuObserver over an initialised NVML. Remembers each GPU's identity, so a GPU that
    is lost later is still reported under its uuid and name."""

    name = "nvml"
    simulated = False

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._known: dict[int, _Identity] = {}
        self._closed = False

    def observe(self) -> observed.GpuSnapshot:
        nvml = self._nvml
        errors: list[str] = []
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            errors.append(f"NVML cannot count the GPUs: {exc}")
            count = 0
        indices = sorted(set(range(count)) | set(self._known))
        gpus = tuple(self._observe_one(i, errors) for i in indices)
        return observed.GpuSnapshot(gpus=gpus, simulated=False, errors=tuple(errors))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _shutdown_quietly(self._nvml)

    def _observe_one(self, index: int, errors: list[str]) -> observed.Gpu:
        nvml = self._nvml
        problems: list[str] = []
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            ident = self._identity(index, handle)
        except nvml.NVMLError as exc:
            return self._unreachable(index, exc, errors)

        def read(what: str, call: Callable[[], T]) -> T | None:
            try:
                return call()
            except nvml.NVMLError as exc:
                if type(exc).__name__ in _LOST_ERRORS:
                    raise _GpuLost(what) from exc
                if type(exc).__name__ not in _QUIET_ERRORS:
                    problems.append(f"{what}: {exc}")
                return None

        try:
            memory = read("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
            util = read("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
            sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
            temp = read("temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, sensor))
            power = read("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            procs = read("processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle))
            mig = read("MIG mode", lambda: nvml.nvmlDeviceGetMigMode(handle))
        except _GpuLost as lost:
            cause = lost.__cause__ if lost.__cause__ is not None else lost
            return self._unreachable(index, cause, errors)

        if memory is not None:
            total = ident.total_mib
            used = math.ceil(int(memory.used) / MIB)  # rounded so that planning errs on the
            free = int(memory.free) // MIB  # side of less room, never more
        else:
            total, used, free = ident.total_mib, ident.total_mib, 0  # unknown: offer no room
        error = "; ".join(problems) or None
        errors.extend(f"GPU {index}: {p}" for p in problems)
        return observed.Gpu(
            index=index,
            uuid=ident.uuid,
            name=ident.name,
            vram_total_mib=total,
            vram_used_mib=used,
            vram_free_mib=free,
            pci_bus_id=ident.pci_bus_id,
            utilization_pct=int(util.gpu) if util is not None else None,
            temperature_c=int(temp) if temp is not None else None,
            power_mw=int(power) if power is not None else None,
            mig_enabled=bool(mig is not None and int(mig[0]) == 1),
            processes=_processes(procs or ()),
            error=error,
        )

    def _identity(self, index: int, handle: Any) -> _Identity:
        """uuid, name, bus id and total memory; read once, they do not change while up."""
        known = self._known.get(index)
        if known is not None:
            return known
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        ident = _Identity(
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
            total_mib=int(memory.total) // MIB,
        )
        self._known[index] = ident
        return ident

    def _unreachable(self, index: int, exc: BaseException, errors: list[str]) -> observed.Gpu:
        """A GPU that cannot be read: shown with what was last known and no free memory."""
        kind = type(exc).__name__
        if kind in _LOST_ERRORS:
            message = (
                f"GPU is lost: it stopped answering NVML ({exc}), often after falling off the "
                "bus; check `nvidia-smi` and `sudo dmesg | grep -i xid`, a reboot is usually needed"
            )
        else:
            message = f"cannot be read: {exc}"
        errors.append(f"GPU {index}: {message}")
        known = self._known.get(index)
        total = known.total_mib if known else 0
        return observed.Gpu(
            index=index,
            uuid=known.uuid if known else "",
            name=known.name if known else "",
            vram_total_mib=total,
            vram_used_mib=total,
            vram_free_mib=0,
            pci_bus_id=known.pci_bus_id if known else "",
            error=message,
        )


def _text(value: object) -> str:
    # nvidia-ml-py decodes names and uuids but returns struct fields (busId) as bytes
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _processes(procs: Any) -> tuple[observed.GpuProcess, ...]:
    out = []
    for p in procs:
        used = p.usedGpuMemory  # None where the driver cannot tell (Windows WDDM)
        out.append(
            observed.GpuProcess(pid=int(p.pid), used_mib=math.ceil(int(used) / MIB) if used else 0)
        )
    return tuple(sorted(out, key=lambda p: p.pid))


@dataclass(frozen=True)
class GpuFacts:
    """What `orchctl doctor` and the provisioner need to know of one GPU."""

    index: int
    name: str
    compute_capability: tuple[int, int] | None  # (8, 6) for an RTX 3090
    vram_total_mib: int
    vram_free_mib: int
    error: str | None = None


@dataclass(frozen=True)
class DriverFacts:
    driver: str | None  # "580.159.04"
    cuda: tuple[int, int] | None  # the newest CUDA the driver runs, (13, 0)
    gpus: tuple[GpuFacts, ...]


def read_facts(nvml: Any = None) -> DriverFacts:
    """The driver's version and CUDA version and every GPU's compute capability and VRAM;
    raises EnvironmentMissing (with the fix) as `open_nvml` does."""
    observer = open_nvml(nvml)
    lib = observer._nvml
    try:

        def guarded(call: Callable[[], T]) -> T | None:
            try:
                return call()
            except lib.NVMLError:
                return None

        driver = guarded(lib.nvmlSystemGetDriverVersion)
        cuda = guarded(lib.nvmlSystemGetCudaDriverVersion)
        gpus = []
        for g in observer.observe().gpus:
            handle = guarded(partial(lib.nvmlDeviceGetHandleByIndex, g.index))
            cc = None
            if handle is not None:
                cc = guarded(partial(lib.nvmlDeviceGetCudaComputeCapability, handle))
            gpus.append(
                GpuFacts(
                    index=g.index,
                    name=g.name,
                    compute_capability=(int(cc[0]), int(cc[1])) if cc else None,
                    vram_total_mib=g.vram_total_mib,
                    vram_free_mib=g.vram_free_mib,
                    error=g.error,
                )
            )
        return DriverFacts(
            driver=_text(driver) if driver is not None else None,
            cuda=(int(cuda) // 1000, int(cuda) % 1000 // 10) if cuda else None,
            gpus=tuple(gpus),
        )
    finally:
        observer.close()


def cuda_archs(gpus: Sequence[GpuFacts]) -> tuple[str, ...]:
    """CMAKE_CUDA_ARCHITECTURES for these GPUs: ("86", "89") for a 3090 and a 4060."""
    found = {f"{cc[0]}{cc[1]}" for g in gpus if (cc := g.compute_capability)}
    return tuple(sorted(found, key=int))


def _factory(config: desired.DesiredState, base: Path) -> interfaces.GpuObserver:
    return open_nvml()


class _NvmlPlugin:
    @hookspecs.hookimpl
    def orch_register_gpu_observers(self, register: Callable[[str, Any], None]) -> None:
        register("nvml", _factory)


plugin = _NvmlPlugin()
