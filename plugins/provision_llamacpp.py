"""The llama.cpp provisioner: builds `llama-server` with CUDA for this machine's GPUs, cached.

`orchctl up`, `scripts/gpu-smoke.sh` and the tests call `ensure`; it is registered through
`orch_register_provisioners`. The source is a PyPI sdist, a local checkout, a git URL at a
pinned ref or an existing binary (`plugins.llamacpp_sources`). A CUDA build targets exactly
the compute capabilities NVML reports (CMAKE_CUDA_ARCHITECTURES=86;89 for a 3090 + 4060), which
is several times faster to compile than llama.cpp's default list; `-G Ninja` when ninja is
installed; TLS, libcurl and NCCL off, so nothing but cmake, a compiler and the CUDA toolkit
is needed. Each build lands in its own cache folder named by its key,

    ~/.cache/llama-orch/llama.cpp/<version>-<backend>[-sm<archs>][-<source id>]/
        bin/llama-server     statically linked, installed by an atomic rename
        bin/engine.json      the engine record: version, source, commit, flags, path, built_at
        build.log            cmake's whole output (kept after a failure, for the report)

and is reused by every later run with the same key; a failed build leaves no binary, and the
next `ensure` builds again. The engine finds the newest CUDA build through `find_builds`.

    python -m plugins.provision_llamacpp [--source pypi:0.3.36|path:DIR|git+URL@REF|binary:FILE]
                                         [--cpu] [--archs 86;89] [--jobs N] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from plugins import gpu_nvml, hookspecs, host_packages, interfaces, llamacpp_sources

DEFAULT_VERSION = llamacpp_sources.DEFAULT_VERSION


def default_cache() -> Path:
    """~/.cache/llama-orch/llama.cpp, read when called: tests move HOME."""
    return Path.home() / ".cache" / "llama-orch" / "llama.cpp"


RECORD = "engine.json"
Backend = Literal["cuda", "cpu"]
# Where distributions put nvcc when it is not on PATH (Arch: /opt/cuda; NVIDIA: /usr/local/cuda)
NVCC_PLACES = (Path("/opt/cuda/bin/nvcc"), Path("/usr/local/cuda/bin/nvcc"))
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")
PROGRESS_EVERY_S = 15.0


class EngineBuild(BaseModel):
    """The engine record written beside each binary (`bin/engine.json`)."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["llamacpp"] = "llamacpp"
    key: str
    version: str
    source: str
    commit: str | None = None
    backend: Backend | Literal["binary"]
    cuda_archs: list[str] = []
    flags: list[str] = []
    path: str
    built_at: str
    build_log: str | None = None
    build_s: float | None = None


# -- keys and command lines (pure) -----------------------------------------------------------


def cache_key(
    source: llamacpp_sources.Source,
    backend: Backend,
    archs: Sequence[str] = (),
    *,
    commit: str | None = None,
) -> str:
    """Source, version, backend and CUDA archs: a change in any of them is another build."""
    if source.kind == "binary":
        return f"binary-{hashlib.sha256(source.location.encode()).hexdigest()[:10]}"
    parts = [source.version, backend]
    if backend == "cuda" and archs:
        parts.append("sm" + ".".join(archs))
    identity = source.identity
    if identity and source.kind == "path" and commit:  # a checkout moved on: build again
        tag = hashlib.sha256(f"{source}@{commit}".encode()).hexdigest()[:10]
        identity = f"path.{tag}"
    if identity:
        parts.append(identity)
    return "-".join(parts)


def cached_binary(
    version: str = DEFAULT_VERSION,
    *,
    cpu: bool = False,
    archs: Sequence[str] = (),
    cache: Path | None = None,
) -> Path:
    """Where the PyPI build of `version` is (or will be) installed."""
    source = llamacpp_sources.parse(version)
    return (
        (cache or default_cache())
        / cache_key(source, "cpu" if cpu else "cuda", archs)
        / "bin"
        / "llama-server"
    )


def configure_flags(backend: Backend, archs: Sequence[str], nvcc: Path | None = None) -> list[str]:
    """The -D options: a static llama-server without TLS, curl or NCCL, for these GPUs."""
    flags = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DGGML_NATIVE=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=ON",
        f"-DGGML_CUDA={'ON' if backend == 'cuda' else 'OFF'}",
    ]
    if backend == "cuda":
        flags.append("-DGGML_CUDA_NCCL=OFF")
        if archs:
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
        if nvcc is not None:
            flags.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    return flags


def configure_command(tree: Path, build: Path, flags: Sequence[str], *, ninja: bool) -> list[str]:
    return ["cmake", "-S", str(tree), "-B", str(build), *(["-G", "Ninja"] if ninja else []), *flags]


def build_command(build: Path, jobs: int) -> list[str]:
    return ["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)]


def step_of(line: str) -> float | None:
    """The fraction done that a ninja (`[12/345]`) or make (`[ 45%]`) line shows."""
    if m := _NINJA_STEP.match(line):
        done, total = int(m.group(1)), int(m.group(2))
        return done / total if total else None
    if m := _MAKE_STEP.match(line):
        return int(m.group(1)) / 100
    return None


# -- finding builds --------------------------------------------------------------------------


def read_record(binary: Path) -> EngineBuild | None:
    try:
        return EngineBuild.model_validate_json((binary.parent / RECORD).read_bytes())
    except (OSError, ValueError):
        return None


def find_builds(cache: Path | None = None) -> list[EngineBuild]:
    """Every finished build with its record, newest first."""
    found = []
    for record_path in (cache or default_cache()).glob(f"*/bin/{RECORD}"):
        record = read_record(record_path.parent / "llama-server")
        if record is not None and _executable(Path(record.path)):
            found.append(record)
    return sorted(found, key=lambda r: r.built_at, reverse=True)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


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
    cache = cache or default_cache()
    if src.kind == "binary":
        return _install_binary(src, cache, progress)
    backend: Backend = "cpu" if cpu else "cuda"
    if archs is None and backend == "cuda":
        archs = _detect_archs(nvml, progress)
    archs = tuple(archs or ()) if backend == "cuda" else ()
    commit = _path_commit(src)
    key = cache_key(src, backend, archs, commit=commit)
    home = cache / key
    target = home / "bin" / "llama-server"
    if not rebuild and _executable(target):
        return target
    tools = _tools(backend, git=src.kind == "git")
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        if not rebuild and _executable(target):  # another orchctl built it while we waited
            return target
        return _build(src, key, home, backend, archs, tools, jobs, progress)


def _build(
    src: llamacpp_sources.Source,
    key: str,
    home: Path,
    backend: Backend,
    archs: Sequence[str],
    tools: dict[str, Path | None],
    jobs: int | None,
    progress: Callable[[str], None],
) -> Path:
    began = time.monotonic()
    work, build, log_path = home / "work", home / "build", home / "build.log"
    target = home / "bin" / "llama-server"
    fetched = llamacpp_sources.fetch(src, work, sdists=home.parent / "sdists", progress=progress)
    flags = configure_flags(backend, archs, tools.get("nvcc_outside_path"))
    what = f"CUDA for sm {', '.join(archs)}" if archs else "CUDA, default archs"
    progress(f"configuring llama.cpp ({what if backend == 'cuda' else 'CPU-only, for tests'})")
    with log_path.open("w", encoding="utf-8") as log:
        configure = configure_command(fetched.tree, build, flags, ninja=tools["ninja"] is not None)
        _stream(configure, log, log_path, lambda _: None)
        n = jobs or os.cpu_count() or 2
        progress(f"building llama-server with {n} jobs (log: {log_path})")
        _stream(build_command(build, n), log, log_path, _reporter(progress))
    built = build / "bin" / "llama-server"
    if not _executable(built):
        raise RuntimeError(f"the build finished but made no {built} (log: {log_path})")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(".llama-server.partial")
    shutil.copy2(built, partial)
    os.replace(partial, target)  # a half-copied binary is never taken for a build
    record = EngineBuild(
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
    _write_record(target, record)
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
    if not _executable(binary):
        raise interfaces.EnvironmentMissing(
            f"{binary} does not exist or is not executable",
            "give binary: the path of a llama-server built with CUDA",
        )
    key = cache_key(src, "cuda")
    target = cache / key / "bin" / "llama-server"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != binary.resolve():
        tmp = target.with_name(".llama-server.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(binary)
        os.replace(tmp, target)
        progress(f"using {binary}")
    record = EngineBuild(
        key=key,
        version=_binary_version(binary),
        source=str(src),
        backend="binary",
        path=str(target),
        built_at=_now(),
    )
    _write_record(target, record)
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


def _write_record(target: Path, record: EngineBuild) -> None:
    path = target.parent / RECORD
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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


def _tools(backend: Backend, *, git: bool) -> dict[str, Path | None]:
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
        outside = next((p for p in NVCC_PLACES if _executable(p)), None) if not nvcc else None
        if nvcc is None and outside is None:
            raise missing("the CUDA toolkit (nvcc)", host_packages.NVCC)
        tools["nvcc_outside_path"] = outside
    return tools


def _stream(argv: list[str], log: Any, log_path: Path, on_line: Callable[[str], None]) -> None:
    """Run `argv`, its output appended to the log and each line shown to `on_line`."""
    log.write(f"$ {' '.join(argv)}\n")
    log.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
    try:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
    except OSError as exc:
        raise RuntimeError(f"cannot run {argv[0]}: {exc}") from exc
    tail: list[str] = []
    with proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                tail = [*tail[-24:], line.rstrip()]
                on_line(line)
        except BaseException:  # Ctrl-C: stop the compiler too, not only Python
            proc.kill()
            raise
        code = proc.wait()
    log.flush()
    if code != 0:
        shown = "\n".join(f"  {t}" for t in tail[-12:])
        raise RuntimeError(
            f"`{' '.join(argv[:3])} …` failed (exit {code}); the last lines:\n{shown}\n"
            f"the whole log: {log_path}"
        )


def _reporter(progress: Callable[[str], None]) -> Callable[[str], None]:
    """Progress lines from the build's output: every 10 % or PROGRESS_EVERY_S seconds."""
    last = {"pct": -10, "at": time.monotonic()}

    def on_line(line: str) -> None:
        fraction = step_of(line)
        if fraction is None:
            return
        pct = int(fraction * 100)
        now = time.monotonic()
        due = pct >= last["pct"] + 10 or now - last["at"] >= PROGRESS_EVERY_S
        if pct > last["pct"] and (due or pct == 100):
            last["pct"], last["at"] = pct, now
            progress(f"building llama-server: {pct}% ({line.split(']', 1)[0].strip('[ ')})")

    return on_line


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

    def builds(self, cache: Path | None = None) -> list[EngineBuild]:
        return find_builds(cache)


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
