"""The llama.cpp provisioner: builds `llama-server` with CUDA for this machine's GPUs, cached.

`orchctl up`, `scripts/gpu-smoke.sh` and the tests call `ensure`; it is registered through
`orch_register_provisioners`. The source is a PyPI sdist, a local checkout, a git URL at a
pinned ref or an existing binary (`plugins.llamacpp_sources`). A CUDA build targets exactly
the compute capabilities NVML reports (CMAKE_CUDA_ARCHITECTURES=86;89 for a 3090 + 4060), which
is several times faster to compile than llama.cpp's default list; `-G Ninja` when ninja is
installed; TLS, libcurl and NCCL off, so nothing but cmake, a compiler and the CUDA toolkit
is needed (a missing tool is refused up front, with its fix). Each build lands in its own
cache folder named by its key (the layout, keys, command lines and records are in
`plugins.llamacpp_builds`) and is reused by every later run with the same key; a failed build
leaves no binary, and the next `ensure` builds again. Concurrent `ensure`s of one key wait on
a lock, and the second finds the first one's build.

    python -m plugins.provision_llamacpp [--source pypi:0.3.36|path:DIR|git+URL@REF|binary:FILE]
                                         [--cpu] [--archs 86;89] [--jobs N] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from plugins import (
    gpu_nvml,
    hookspecs,
    host_packages,
    interfaces,
    llamacpp_builds,
    llamacpp_sources,
)

DEFAULT_VERSION = llamacpp_sources.DEFAULT_VERSION
# Where distributions put nvcc when it is not on PATH (Arch: /opt/cuda; NVIDIA: /usr/local/cuda)
NVCC_PLACES = (Path("/opt/cuda/bin/nvcc"), Path("/usr/local/cuda/bin/nvcc"))


# -- building --------------------------------------------------------------------------------


def ensure(
    source: str | llamacpp_sources.Source = DEFAULT_VERSION,
    *,
    cpu: bool = False,
    archs: Sequence[str] | None = None,
    cache: Path | None = None,
    jobs: int | None = None,
    rebuild: bool = False,
    progress: Callable[[str], None] = print,
    nvml: Any = None,
) -> Path:
    """The cached `llama-server` for `source`, built first when it is not there.

    `archs` None: the compute capabilities of the GPUs NVML sees (`nvml` is the pynvml module
    for tests); none seen means llama.cpp's default list. Raises EnvironmentMissing when a
    tool is missing (with the fix) and RuntimeError when the build fails (with the log's tail
    and where the whole log is)."""
    src = source if isinstance(source, llamacpp_sources.Source) else llamacpp_sources.parse(source)
    cache = cache or llamacpp_builds.default_cache()
    if src.kind == "binary":
        return _install_binary(src, cache, progress)
    backend: llamacpp_builds.Backend = "cpu" if cpu else "cuda"
    if archs is None and backend == "cuda":
        archs = _detect_archs(nvml, progress)
    archs = tuple(archs or ()) if backend == "cuda" else ()
    commit = _path_commit(src)
    key = llamacpp_builds.cache_key(src, backend, archs, commit=commit)
    home = cache / key
    target = home / "bin" / "llama-server"
    if not rebuild and llamacpp_builds.executable(target):
        return target
    tools = _tools(backend, git=src.kind == "git")
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        if not rebuild and llamacpp_builds.executable(
            target
        ):  # another orchctl built it while we waited
            return target
        return _build(src, key, home, backend, archs, tools, jobs, progress)


def _build(
    src: llamacpp_sources.Source,
    key: str,
    home: Path,
    backend: llamacpp_builds.Backend,
    archs: Sequence[str],
    tools: dict[str, Path | None],
    jobs: int | None,
    progress: Callable[[str], None],
) -> Path:
    began = time.monotonic()
    work, build, log_path = home / "work", home / "build", home / "build.log"
    target = home / "bin" / "llama-server"
    fetched = llamacpp_sources.fetch(src, work, sdists=home.parent / "sdists", progress=progress)
    flags = llamacpp_builds.configure_flags(backend, archs, tools.get("nvcc_outside_path"))
    what = f"CUDA for sm {', '.join(archs)}" if archs else "CUDA, default archs"
    progress(f"configuring llama.cpp ({what if backend == 'cuda' else 'CPU-only, for tests'})")
    with log_path.open("w", encoding="utf-8") as log:
        configure = llamacpp_builds.configure_command(
            fetched.tree, build, flags, ninja=tools["ninja"] is not None
        )
        llamacpp_builds.run_logged(configure, log, log_path, lambda _: None)
        n = jobs or os.cpu_count() or 2
        progress(f"building llama-server with {n} jobs (log: {log_path})")
        llamacpp_builds.run_logged(
            llamacpp_builds.build_command(build, n),
            log,
            log_path,
            llamacpp_builds.reporter(progress),
        )
    built = build / "bin" / "llama-server"
    if not llamacpp_builds.executable(built):
        raise RuntimeError(f"the build finished but made no {built} (log: {log_path})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(".llama-server.partial")
    shutil.copy2(built, partial)
    os.replace(partial, target)  # a half-copied binary is never taken for a build
    record = llamacpp_builds.EngineBuild(
        key=key,
        version=src.version,
        source=str(src),
        commit=fetched.commit,
        backend=backend,
        cuda_archs=list(archs),
        flags=flags,
        path=str(target),
        built_at=_now(),
        build_log=str(log_path),
        build_s=round(time.monotonic() - began, 1),
    )
    llamacpp_builds.write_record(target, record)
    for scratch in (build, work):  # GBs for a CUDA build; the log and the binary stay
        shutil.rmtree(scratch, ignore_errors=True)
    progress(f"installed {target} ({record.build_s:.0f} s)")
    return target


def _install_binary(
    src: llamacpp_sources.Source, cache: Path, progress: Callable[[str], None]
) -> Path:
    """An existing llama-server: linked into the cache with a record, so it is found like a
    build. Its GPU support is checked when a replica starts (`--list-devices`)."""
    binary = Path(src.location)
    if not llamacpp_builds.executable(binary):
        raise interfaces.EnvironmentMissing(
            f"{binary} does not exist or is not executable",
            "give binary: the path of a llama-server built with CUDA",
        )
    key = llamacpp_builds.cache_key(src, "cuda")
    target = cache / key / "bin" / "llama-server"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != binary.resolve():
        tmp = target.with_name(".llama-server.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary)
        os.replace(tmp, target)
        progress(f"using {binary}")
    record = llamacpp_builds.EngineBuild(
        key=key,
        version=_binary_version(binary),
        source=str(src),
        backend="binary",
        path=str(target),
        built_at=_now(),
    )
    llamacpp_builds.write_record(target, record)
    return target


def _binary_version(binary: Path) -> str:
    """`version: 6500 (abc1234)` from `llama-server --version`, or `unknown`."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version:"):
                return line.removeprefix("version:").strip()
    return "unknown"


def _detect_archs(nvml: Any, progress: Callable[[str], None]) -> tuple[str, ...]:
    try:
        facts = gpu_nvml.read_facts(nvml)
    except interfaces.EnvironmentMissing as exc:
        progress(
            f"no GPU seen ({exc.what}): building for llama.cpp's default CUDA architectures, "
            "which takes longer; pass --archs (e.g. 86;89) to choose"
        )
        return ()
    archs = gpu_nvml.cuda_archs(facts.gpus)
    shown = ", ".join(
        f"{g.name} ({g.compute_capability[0]}.{g.compute_capability[1]})"
        for g in facts.gpus
        if g.compute_capability
    )
    if archs:
        progress(f"building for {shown}: CMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
    return archs


def _path_commit(src: llamacpp_sources.Source) -> str | None:
    if src.kind != "path" or not (Path(src.location) / ".git").exists():
        return None
    with contextlib.suppress(OSError, RuntimeError):
        return llamacpp_sources.run(["git", "-C", src.location, "rev-parse", "HEAD"]).strip()
    return None


def _tools(backend: llamacpp_builds.Backend, *, git: bool) -> dict[str, Path | None]:
    """The build tools, or EnvironmentMissing naming the first one missing with its fix."""

    def which(name: str) -> Path | None:
        found = shutil.which(name)
        return Path(found) if found else None

    def missing(what: str, fix: host_packages.Fix) -> interfaces.EnvironmentMissing:
        return interfaces.EnvironmentMissing(
            f"{what} is needed to build llama.cpp and was not found on PATH",
            f"Install it:\n{fix.text()}\nthen run this again (`orchctl doctor` checks them all).",
        )

    if which("cmake") is None:
        raise missing("cmake", host_packages.CMAKE)
    if not any(which(c) for c in ("c++", "g++", "clang++")):
        raise missing("a C++ compiler (g++ or clang++)", host_packages.COMPILER)
    if git and which("git") is None:
        raise missing("git", host_packages.GIT)
    tools: dict[str, Path | None] = {"cmake": which("cmake"), "ninja": which("ninja")}
    if backend == "cuda":
        nvcc = which("nvcc")
        outside = (
            next((p for p in NVCC_PLACES if llamacpp_builds.executable(p)), None)
            if not nvcc
            else None
        )
        if nvcc is None and outside is None:
            raise missing("the CUDA toolkit (nvcc)", host_packages.NVCC)
        tools["nvcc_outside_path"] = outside
    return tools


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class LlamaCppProvisioner:
    engine = "llamacpp"

    def ensure(self, source: str = DEFAULT_VERSION, **kwargs: Any) -> Path:
        return ensure(source, **kwargs)

    def builds(self, cache: Path | None = None) -> list[llamacpp_builds.EngineBuild]:
        return llamacpp_builds.find_builds(cache)


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_provisioners(self, register: Callable[[str, Any], None]) -> None:
        register("llamacpp", LlamaCppProvisioner())


plugin = _Plugin()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--source",
        "--version",
        default=DEFAULT_VERSION,
        help="pypi:VERSION (or a bare version), path:DIR, git+URL@REF or binary:FILE",
    )
    parser.add_argument("--cpu", action="store_true", help="CPU-only build, for tests only")
    parser.add_argument("--archs", help="CUDA architectures, e.g. 86;89 (default: the GPUs seen)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--rebuild", action="store_true", help="build even when cached")
    parser.add_argument(
        "--cache", type=Path, help="the build cache (~/.cache/llama-orch/llama.cpp)"
    )
    args = parser.parse_args(argv)
    archs = [a for a in re.split(r"[;,\s]+", args.archs) if a] if args.archs else None
    try:
        path = ensure(
            args.source,
            cpu=args.cpu,
            archs=archs,
            cache=args.cache,
            jobs=args.jobs,
            rebuild=args.rebuild,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 2
    except interfaces.EnvironmentMissing as exc:
        print(f"provision: {exc.what}\n{exc.fix}", file=sys.stderr)
        return 3
    except RuntimeError as exc:
        print(f"provision: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
