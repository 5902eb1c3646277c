"""The llama.cpp provisioner: builds `llama-server` from source, cached by version.

llama.cpp's source comes from PyPI, inside the `llama-cpp-python` sdist (vendor/llama.cpp),
so a build needs nothing but PyPI, cmake and a compiler (and the CUDA toolkit for GPU builds).
Builds land in `~/.cache/llama-orch/llama.cpp/<version>/bin/llama-server` (a CPU-only build,
for tests only, in `<version>-cpu/`), statically linked so the binary stands alone, and are
reused by every later run. Registered through `orch_register_provisioners`; `orchctl up` and
the tests call `ensure`.

    python -m plugins.provision_llamacpp [--version 0.3.36] [--cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugins import hookspecs

DEFAULT_VERSION = "0.3.36"  # llama-cpp-python release whose vendor/llama.cpp we build
CACHE = Path.home() / ".cache" / "llama-orch" / "llama.cpp"


def cached_binary(
    version: str = DEFAULT_VERSION, *, cpu: bool = False, cache: Path = CACHE
) -> Path:
    return cache / (f"{version}-cpu" if cpu else version) / "bin" / "llama-server"


def ensure(
    version: str = DEFAULT_VERSION,
    *,
    cpu: bool = False,
    cache: Path = CACHE,
    jobs: int | None = None,
    progress: Callable[[str], None] = print,
) -> Path:
    """The cached `llama-server` of `version`, building it first when it is not there."""
    target = cached_binary(version, cpu=cpu, cache=cache)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if not shutil.which("cmake"):
        raise RuntimeError(
            "cmake is needed to build llama.cpp: apt install cmake / pacman -S cmake"
        )
    with tempfile.TemporaryDirectory(prefix="llama-orch-build-") as tmp:
        work = Path(tmp)
        progress(f"downloading llama-cpp-python=={version} source from PyPI")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(work),
            ],
            progress,
        )
        sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        flags = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DGGML_NATIVE=OFF",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            f"-DGGML_CUDA={'OFF' if cpu else 'ON'}",
        ]
        progress(f"configuring ({'CPU-only, for tests' if cpu else 'CUDA'})")
        _run(["cmake", "-S", str(source), "-B", str(build), *flags], progress)
        progress("building llama-server (several minutes)")
        _run(
            [
                "cmake",
                "--build",
                str(build),
                "--target",
                "llama-server",
                "-j",
                str(jobs or os.cpu_count() or 2),
            ],
            progress,
        )
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        os.replace(partial, target)  # a half-copied binary is never taken for a build
    progress(f"installed {target}")
    return target


def _run(argv: list[str], progress: Callable[[str], None]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise RuntimeError(f"{' '.join(argv[:3])} … failed ({proc.returncode}):\n{tail}")


class LlamaCppProvisioner:
    engine = "llamacpp"

    def ensure(self, version: str = DEFAULT_VERSION, **kwargs: Any) -> Path:
        return ensure(version, **kwargs)


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_provisioners(self, register: Callable[[str, Any], None]) -> None:
        register("llamacpp", LlamaCppProvisioner())


plugin = _Plugin()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", default=DEFAULT_VERSION)
    parser.add_argument("--cpu", action="store_true", help="CPU-only build, for tests only")
    args = parser.parse_args(argv)
    print(ensure(args.version, cpu=args.cpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
