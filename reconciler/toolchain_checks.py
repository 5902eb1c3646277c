"""The build-tool checks of `orchctl doctor` (called by `reconciler.diagnosing.diagnose`).

The CUDA toolkit against the driver's CUDA version and the GPUs' compute capabilities, cmake,
a C++ compiler, ninja and git, each found on `path` and asked for `--version`. A missing
tool fails only when it is `needed` (no llama-server to use yet), else it warns; ninja and
git only ever warn. Each problem carries its fix (`plugins.host_packages`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Callable

from plugins import gpu_nvml, host_packages, provision_llamacpp

MIN_CMAKE = (3, 18)  # CUDA as a first-class cmake language
CUDA13_MIN_CC = (7, 5)  # CUDA 13 dropped Maxwell, Pascal and Volta
Add = Callable[..., None]  # add(name, status, detail, fix=None)


def check(add: Add, *, path: str | None, facts: gpu_nvml.DriverFacts | None, needed: bool) -> bool:
    """Report each tool through `add`; True when a CUDA llama-server could be built here."""

    missing_status = "fail" if needed else "warn"
    why = "" if needed else " (only needed to build llama.cpp again)"
    ok = True
    nvcc = shutil.which("nvcc", path=path) or next(
        (str(p) for p in provision_llamacpp.NVCC_PLACES if p.is_file()), None
    )
    if nvcc is None:
        add("CUDA toolkit", missing_status, f"nvcc not found{why}", host_packages.NVCC)
        ok = False
    else:
        ok = _toolkit(add, nvcc, missing_status, path, facts) and ok
    cmake = _version(path, "cmake", r"cmake version (\d+)\.(\d+)(?:\.(\d+))?")
    if cmake is None:
        add("cmake", missing_status, f"cmake not found{why}", host_packages.CMAKE)
        ok = False
    elif cmake[:2] < MIN_CMAKE:
        add(
            "cmake",
            missing_status,
            f"cmake {dotted(cmake)} is older than 3.18",
            host_packages.CMAKE,
        )
        ok = False
    else:
        add("cmake", "ok", f"cmake {dotted(cmake)}")
    compiler = next((c for c in ("c++", "g++", "clang++") if shutil.which(c, path=path)), None)
    if compiler is None:
        add(
            "C++ compiler",
            missing_status,
            f"no c++, g++ or clang++ found{why}",
            host_packages.COMPILER,
        )
        ok = False
    else:
        add("C++ compiler", "ok", _first_line(path, compiler) or compiler)
    if _version(path, "ninja", r"(\d+)\.(\d+)(?:\.(\d+))?") is None:
        add(
            "ninja",
            "warn",
            "ninja not found: builds fall back to make, which is slower",
            host_packages.NINJA,
        )
    else:
        add("ninja", "ok", f"ninja {_first_line(path, 'ninja')}")
    if _version(path, "git", r"git version (\d+)\.(\d+)(?:\.(\d+))?") is None:
        add("git", "warn", "git not found: only needed for git+URL@REF sources", host_packages.GIT)
    else:
        add("git", "ok", _first_line(path, "git") or "git")
    return ok


def _toolkit(
    add: Add, nvcc: str, missing: str, path: str | None, facts: gpu_nvml.DriverFacts | None
) -> bool:
    found = _version(path, nvcc, r"release (\d+)\.(\d+)")
    if found is None:
        add("CUDA toolkit", missing, f"{nvcc} --version printed no release", host_packages.NVCC)
        return False
    toolkit = (found[0], found[1])
    detail = f"CUDA toolkit {dotted(toolkit)} ({nvcc})"
    driver = facts.cuda if facts else None
    if driver is not None and toolkit[0] > driver[0]:
        add(
            "CUDA toolkit",
            missing,
            f"{detail} is newer than the driver, which runs CUDA up to {dotted(driver)}: "
            "what it builds will not start",
            host_packages.DRIVER_UPDATE,
        )
        return False
    old = [
        g
        for g in (facts.gpus if facts else ())
        if g.compute_capability and toolkit[0] >= 13 and g.compute_capability < CUDA13_MIN_CC
    ]
    if old:
        names = ", ".join(
            f"GPU {g.index} ({dotted(g.compute_capability)})" for g in old if g.compute_capability
        )
        add(
            "CUDA toolkit",
            missing,
            f"{detail} cannot build for {names}",
            host_packages.OLD_GPU_TOOLKIT,
        )
        return False
    if driver is not None and toolkit > driver:
        add(
            "CUDA toolkit",
            "warn",
            f"{detail} is newer than the driver's CUDA {dotted(driver)}; minor-version "
            "compatibility usually holds, but update the driver if engines fail to start",
            host_packages.DRIVER_UPDATE,
        )
        return True
    runs = f", the driver runs up to {dotted(driver)}" if driver else ""
    add("CUDA toolkit", "ok", detail + runs)
    return True


def _version(path: str | None, tool: str, pattern: str) -> tuple[int, ...] | None:
    text = _output(path, tool)
    m = re.search(pattern, text or "")
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


def _first_line(path: str | None, tool: str) -> str | None:
    text = _output(path, tool)
    return text.strip().splitlines()[0] if text and text.strip() else None


def _output(path: str | None, tool: str) -> str | None:
    exe = tool if "/" in tool else shutil.which(tool, path=path)
    if exe is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
        return proc.stdout + proc.stderr
    return None


def dotted(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "unknown"
