"""What `orchctl doctor` (and `orchctl up`, before it builds anything) checks on this machine.

`diagnose` runs every check and returns them in the order a reader fixes them: the driver
and NVML, each GPU (free VRAM, compute capability), the CUDA toolkit against the driver's
CUDA version and the GPUs, cmake / a C++ compiler / ninja / git, the engine and model caches,
the API port, and the disk space under the cache. Each failed check carries its fix for
Arch/CachyOS and Debian/Ubuntu (`plugins.host_packages`).

Serving is possible when nothing failed: a GPU is seen, a CUDA llama-server is cached (or
everything needed to build one is there), the port is free or already served by llama-orch,
and the disk is not full. Missing build tools fail only when there is no build to use; ninja
and git are only ever warnings. `simulate` (an inventory) skips what only real GPUs need.
Everything it touches is a parameter (the pynvml module, PATH, the caches), so tests run it
on a fake machine.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plugins import gpu_nvml, gpu_simulated, host_packages, interfaces, llamacpp_builds
from plugins.engine_llamacpp import cpu_switch_set
from reconciler import toolchain_checks
from state import daemon_lock, desired

Status = Literal["ok", "warn", "fail"]
GIB = 1 << 30
DISK_FAIL_GIB, DISK_WARN_GIB = 2, 10  # a CUDA build needs ~2 GiB of scratch; models many more


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: host_packages.Fix | str | None = None

    def fix_text(self) -> str | None:
        if isinstance(self.fix, host_packages.Fix):
            return self.fix.text()
        return f"  {self.fix}" if self.fix else None


@dataclass
class Diagnosis:
    checks: list[Check] = field(default_factory=list)
    facts: gpu_nvml.DriverFacts | None = None
    builds: list[llamacpp_builds.EngineBuild] = field(default_factory=list)
    can_build: bool = False
    engine_cache_problem: OSError | None = None  # the engine cache could not be listed
    serving_pid: int | None = None  # this folder's own daemon serves already

    @property
    def can_serve(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def add(self, name: str, status: Status, detail: str, fix: Any = None) -> None:
        self.checks.append(Check(name, status, detail, fix))


@dataclass(frozen=True)
class Machine:
    """Where to look: the real machine by default, a fake one in tests."""

    path: str | None = None  # PATH for the tools (None: this process's)
    nvml: Any = None  # the pynvml module (None: the installed one)
    engine_cache: Path = field(default_factory=llamacpp_builds.default_cache)
    model_cache: Path = Path.home() / ".cache" / "llama-orch" / "models"


def diagnose(
    machine: Machine,
    *,
    bind: str = "127.0.0.1:8080",
    simulate: Path | None = None,
    binary: Path | None = None,
    own_lock: Path | None = None,
    llamacpp_pools: bool = False,
) -> Diagnosis:
    """Every check; `binary` is engines.llamacpp.binary of orch.yaml, when it names one;
    `own_lock` the daemon lock of orch.yaml's folder (a daemon serving the port is this
    folder's only when it holds that lock); `llamacpp_pools`: orch.yaml has pools of the
    llamacpp engine (under `simulate` too, they run llama-server)."""
    d = Diagnosis()
    if simulate is not None:
        _simulated(d, simulate)
    else:
        _driver(d, machine)
    try:
        found = llamacpp_builds.find_builds(machine.engine_cache)
    except OSError as exc:  # reported by its own check below, not a crash of the doctor
        found, d.engine_cache_problem = [], exc
    d.builds = [b for b in found if b.backend != "cpu"]
    on_path = shutil.which("llama-server", path=machine.path)
    configured = binary is not None and binary.is_file() and os.access(binary, os.X_OK)
    # a CPU-only build is no engine for the GPU pools: the tools to build one are needed
    usable = (
        configured
        and binary is not None
        and (not llamacpp_builds.cpu_only(binary) or cpu_switch_set())
    )
    have_engine = bool(d.builds or on_path or usable) or simulate is not None
    if simulate is None:
        d.can_build = toolchain_checks.check(
            d.add, path=machine.path, facts=d.facts, needed=not have_engine
        )
    if simulate is not None and llamacpp_pools:
        _simulated_llamacpp(d, binary, configured=configured, on_path=on_path)
    elif binary is not None and simulate is None:
        if configured and llamacpp_builds.cpu_only(binary) and cpu_switch_set():
            d.add("engine", "warn", f"engines.llamacpp.binary {binary}: {CPU_TEST_ONLY}")
        elif configured and llamacpp_builds.cpu_only(binary):  # every llamacpp pool refuses it
            d.add(
                "engine",
                "fail",
                f"engines.llamacpp.binary {binary} is a CPU-only build: llamacpp pools refuse it "
                "(they run on GPUs only)",
                "point engines.llamacpp.binary at a CUDA build of llama-server, or remove it "
                "and run `orchctl up` to build llama.cpp with CUDA",
            )
        elif configured:
            d.add("engine", "ok", f"engines.llamacpp.binary: {binary}")
        else:
            d.add(
                "engine",
                "fail",
                f"engines.llamacpp.binary {binary} does not exist or is not executable",
                "fix engines.llamacpp.binary in orch.yaml, or remove it to use a build",
            )
    elif d.engine_cache_problem is not None and simulate is None:
        _unreadable(d, "engine", machine.engine_cache, d.engine_cache_problem)
    else:
        _engine_cache(d, machine, on_path, simulate=simulate is not None)
    try:
        _model_cache(d, machine)
    except OSError as exc:
        _unreadable(d, "models", machine.model_cache, exc)
    _port(d, bind, own_lock)
    _disk(d, machine)
    return d


# -- GPUs ------------------------------------------------------------------------------------


def _driver(d: Diagnosis, machine: Machine) -> None:
    try:
        facts = gpu_nvml.read_facts(machine.nvml)
    except interfaces.EnvironmentMissing as exc:
        fix = host_packages.NVML_PYTHON if "nvidia-ml-py" in exc.what else host_packages.DRIVER
        d.add("driver", "fail", exc.what, fix)
        return
    d.facts = facts
    cuda = toolchain_checks.dotted(facts.cuda) if facts.cuda else "unknown"
    d.add("driver", "ok", f"NVIDIA driver {facts.driver or 'unknown'}, runs CUDA up to {cuda}")
    for g in facts.gpus:
        cc = (
            f"compute capability {toolchain_checks.dotted(g.compute_capability)}"
            if g.compute_capability
            else ""
        )
        detail = f"{g.name}, {g.vram_free_mib:,} MiB free of {g.vram_total_mib:,} MiB"
        detail += f", {cc}" if cc else ""
        if g.error:
            d.add(f"GPU {g.index}", "warn", f"{detail}; {g.error}", "check it with: nvidia-smi")
        else:
            d.add(f"GPU {g.index}", "ok", detail)


def _simulated(d: Diagnosis, inventory: Path) -> None:
    try:
        loaded = gpu_simulated.load_inventory(inventory)
    except gpu_simulated.InventoryError as exc:
        if not os.path.lexists(inventory):
            d.add(
                "GPUs",
                "fail",
                f"no simulated GPU inventory at {inventory}",
                "write one with `orchctl init --simulate` here (a 24 GB + 12 GB pair, with "
                "an orch.yaml that uses it), or go on with `orchctl up --simulate`, which "
                "writes both",
            )
        else:
            d.add(
                "GPUs",
                "fail",
                str(exc),
                f"fix what each line says in {inventory} (`orchctl validate {inventory}` "
                "checks it again), or pass another with `--simulate INVENTORY`",
            )
        return
    for g in loaded.gpus:
        d.add(f"GPU {g.index}", "ok", f"SIMULATED {g.name}, {g.vram_total_mib:,} MiB")


# -- caches, port, disk ----------------------------------------------------------------------


CPU_TEST_ONLY = (
    "a CPU-only build, served only because the test-only CPU inference switch is on; "
    "never for real work"
)


def _simulated_llamacpp(
    d: Diagnosis, binary: Path | None, *, configured: bool, on_path: str | None
) -> None:
    """The engine check of a simulated workstation whose orch.yaml has llamacpp pools: those
    run llama-server whatever the GPUs are, and refuse a build without CUDA."""
    found = binary if configured else Path(on_path) if on_path else None
    if found is None:
        d.add(
            "engine",
            "fail",
            "orch.yaml has llamacpp pools, and no llama-server is configured or on PATH",
            "set their engine: sim on a simulated workstation (or set engines.llamacpp.binary)",
        )
    elif not llamacpp_builds.cpu_only(found):
        d.add("engine", "ok", f"llama-server for the llamacpp pools: {found}")
    elif cpu_switch_set():
        d.add("engine", "warn", f"llama-server {found}: {CPU_TEST_ONLY}")
    else:
        d.add(
            "engine",
            "fail",
            f"orch.yaml has llamacpp pools, and llama-server {found} is a CPU-only build, "
            "which they refuse (simulated GPUs have no CUDA to run a GPU build on)",
            "set their engine: sim on a simulated workstation, or serve them on real GPUs",
        )


def _engine_cache(d: Diagnosis, machine: Machine, on_path: str | None, *, simulate: bool) -> None:
    where = _home(machine.engine_cache)
    if simulate:
        d.add("engine", "ok", "the sim engine (simulated workstation): nothing to build")
        return
    if not d.builds:
        if on_path:
            d.add("engine", "ok", f"no build under {where}; llama-server on PATH: {on_path}")
        elif d.can_build:
            d.add("engine", "ok", f"no build under {where} yet: `orchctl up` builds one")
        else:
            d.add(
                "engine",
                "fail",
                f"no llama-server under {where} and it cannot be built here (see the checks above)",
            )
        return
    newest = d.builds[0]
    shown = f"{newest.version} {newest.backend}"
    if newest.cuda_archs:
        shown += f" sm{','.join(newest.cuda_archs)}"
    more = f" and {len(d.builds) - 1} more" if len(d.builds) > 1 else ""
    d.add("engine", "ok", f"{where}: {shown}, built {newest.built_at}{more}")
    archs = {int(a) for a in newest.cuda_archs if a.isdigit()}
    uncovered = [
        g
        for g in (d.facts.gpus if d.facts else ())
        if archs
        and g.compute_capability
        and not any(
            a // 10 == g.compute_capability[0] and a % 10 <= g.compute_capability[1] for a in archs
        )
    ]
    if uncovered:
        names = ", ".join(f"GPU {g.index} ({g.name})" for g in uncovered)
        d.add(
            "engine",
            "warn",
            f"the newest build has no code for {names}",
            "run `orchctl up` (or python -m plugins.provision_llamacpp) to build for these GPUs",
        )


def _unreadable(d: Diagnosis, name: str, cache: Path, exc: OSError) -> None:
    where = _home(Path(os.fsdecode(exc.filename)) if exc.filename else cache)
    d.add(
        name,
        "fail",
        f"{where} cannot be read: {exc.strerror or exc}",
        f"give this user its cache back (sudo chown -R $USER {_home(cache)}), or run as the "
        "user who owns it",
    )


def _model_cache(d: Diagnosis, machine: Machine) -> None:
    where = _home(machine.model_cache)
    files = (
        [p for p in machine.model_cache.rglob("*") if p.is_file()]
        if machine.model_cache.is_dir()
        else []
    )
    whole = [p for p in files if not p.name.endswith((".part", ".part.json"))]
    parts = [p for p in files if p.name.endswith(".part")]
    size = sum(p.stat().st_size for p in whole)
    detail = (
        f"{where}: {len(whole)} model file{'s' if len(whole) != 1 else ''}, {size / GIB:.1f} GiB"
    )
    if parts:
        plural = "s" if len(parts) != 1 else ""
        detail += f"; {len(parts)} unfinished download{plural} (resumed when needed)"
    d.add("models", "ok", detail)


def _port(d: Diagnosis, bind: str, own_lock: Path | None = None) -> None:
    host, _, port_text = bind.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port_text.isdigit() or int(port_text) == 0:
        d.add("port", "ok", f"{bind}: a free port is picked at start")
        return
    port = int(port_text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                d.add(
                    "port",
                    "fail",
                    f"cannot listen on {bind}: {exc.strerror or exc}",
                    "set server.bind in orch.yaml to an address of this machine",
                )
                return
        else:
            d.add("port", "ok", f"{bind} is free")
            return
    pid = _llama_orch_pid(host, port)
    if pid is not None and own_lock is not None and daemon_lock.recorded_pid(own_lock) == pid:
        d.add("port", "ok", f"{bind} is served by this folder's llama-orch daemon (pid {pid})")
        d.serving_pid = pid
    elif pid is not None:  # `orchctl up` here would fail to bind
        d.add(
            "port",
            "fail",
            f"{bind} is served by the llama-orch daemon of another folder (pid {pid}), not "
            "this one's",
            f"stop that daemon (Ctrl-C where it runs, or `kill {pid}`: it stops cleanly), "
            "or set server.bind in orch.yaml to another port",
        )
    else:
        d.add(
            "port",
            "fail",
            f"{bind} is used by another program",
            f"see which with: ss -ltnp 'sport = :{port}'; stop it, or set server.bind in "
            "orch.yaml to another port",
        )


def _llama_orch_pid(host: str, port: int) -> int | None:
    shown = f"[{host}]" if ":" in host else host
    with contextlib.suppress(Exception):
        with urllib.request.urlopen(f"http://{shown}:{port}/v1/status", timeout=2) as r:
            data = json.loads(r.read(1 << 20))
        pid = data.get("daemon", {}).get("pid")
        return int(pid) if isinstance(pid, int) else None
    return None


def _disk(d: Diagnosis, machine: Machine) -> None:
    where = machine.engine_cache
    # os.path.exists: a folder this user may not look into counts as absent, not an error
    while not os.path.exists(where) and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free / GIB
    except OSError as exc:
        d.add("disk", "warn", f"free space under {_home(where)} unknown: {exc.strerror or exc}")
        return
    shown = _home(machine.engine_cache.parent)
    if free < DISK_FAIL_GIB:
        d.add(
            "disk",
            "fail",
            f"{free:.1f} GiB free under {shown}: too little to build or download",
            host_packages.DISK,
        )
    elif free < DISK_WARN_GIB:
        d.add(
            "disk",
            "warn",
            f"{free:.1f} GiB free under {shown}: models need several GiB each",
            host_packages.DISK,
        )
    else:
        d.add("disk", "ok", f"{free:.1f} GiB free under {shown}")


# -- helpers ---------------------------------------------------------------------------------


def _home(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return "~/" + str(path.relative_to(Path.home()))
    return str(path)


def llamacpp_pools_of(config: Path) -> bool:
    """Whether orch.yaml, when it can be read, has pools of the llamacpp engine (also one
    invalid elsewhere: its pools are the ones it will serve once fixed)."""
    with contextlib.suppress(Exception):
        loaded = desired.load_desired(config)
        if loaded.value is not None:
            return any(pool.engine == "llamacpp" for pool in loaded.value.pools)
        pools = loaded.data.get("pools") if isinstance(loaded.data, dict) else None
        return any(isinstance(p, dict) and p.get("engine") == "llamacpp" for p in pools or ())
    return False


def engine_binary_of(config: Path) -> Path | None:
    """engines.llamacpp.binary of orch.yaml, when it can be read and names one."""
    with contextlib.suppress(Exception):
        loaded = desired.load_desired(config)
        engine = loaded.value.engines.get("llamacpp") if loaded.value else None
        if engine is not None and engine.binary:
            return Path(engine.binary).expanduser()
    return None


def state_lock_of(config: Path, base: Path | None = None) -> Path:
    """The daemon lock of orch.yaml's folder (`base`, else `config`'s): under its
    paths.state, or the default one where orch.yaml is missing or cannot be read (the
    folder a daemon started here would lock)."""
    state = desired.PathsConfig().state
    with contextlib.suppress(Exception):
        loaded = desired.load_desired(config)
        if loaded.value is not None:
            state = loaded.value.paths.state
    return desired.resolve(base or config.resolve().parent, state) / daemon_lock.STATE_LOCK


def bind_of(config: Path) -> str:
    """server.bind of orch.yaml when it can be read (also from a file invalid elsewhere: the
    port checked is the one its daemon would take once fixed), else the default."""
    with contextlib.suppress(Exception):
        loaded = desired.load_desired(config)
        if loaded.value is not None:
            return loaded.value.server.bind
        server = loaded.data.get("server") if isinstance(loaded.data, dict) else None
        bind = server.get("bind") if isinstance(server, dict) else None
        if isinstance(bind, str) and desired.bind_problem(bind) is None:
            return bind
    return desired.ServerConfig().bind
