"""The llama.cpp build cache: the engine record beside each binary, the key that names each
build's folder, the cmake command lines run into its build.log with their progress shown, and
finding the builds.

    ~/.cache/llama-orch/llama.cpp/<version>-<backend>[-sm<archs>][-<source id>]/
        bin/llama-server     statically linked, installed by an atomic rename
        bin/engine.json      the engine record: version, source, commit, flags, path, built_at
        build.log            cmake's whole output (kept after a failure, for the report)

The provisioner (`provision_llamacpp.ensure`) builds into it; the llamacpp engine and
`orchctl doctor` read it (`find_builds`, newest first). A key names everything that makes
another build (source, version, backend, CUDA archs, a checkout's commit), so a build is reused
by every later run with the same key. Keys and command lines are pure; `run_logged` runs one
command with its output appended to the log, and a failure raises with the log's last lines.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from plugins import llamacpp_sources


def default_cache() -> Path:
    """~/.cache/llama-orch/llama.cpp, read when called: tests move HOME."""
    return Path.home() / ".cache" / "llama-orch" / "llama.cpp"


RECORD = "engine.json"
Backend = Literal["cuda", "cpu"]
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
    version: str = llamacpp_sources.DEFAULT_VERSION,
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


# -- records and finding builds ------------------------------------------------------------


def read_record(binary: Path) -> EngineBuild | None:
    try:
        return EngineBuild.model_validate_json((binary.parent / RECORD).read_bytes())
    except (OSError, ValueError):
        return None


def cpu_only(binary: Path) -> bool:
    """Whether the provisioned `binary` is a CPU-only build: its record says so, or, with no
    record, its build folder is named `<version>-cpu...` (`cache_key`)."""
    record = read_record(binary)
    if record is not None:
        return record.backend == "cpu"
    return binary.parent.parent.name.endswith("-cpu")


def write_record(target: Path, record: EngineBuild) -> None:
    path = target.parent / RECORD
    tmp = path.with_name(f".{RECORD}.tmp")
    tmp.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def find_builds(cache: Path | None = None) -> list[EngineBuild]:
    """Every finished build with its record, newest first."""
    found = []
    for record_path in (cache or default_cache()).glob(f"*/bin/{RECORD}"):
        record = read_record(record_path.parent / "llama-server")
        if record is not None and executable(Path(record.path)):
            found.append(record)
    return sorted(found, key=lambda r: r.built_at, reverse=True)


def executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# -- running the build ----------------------------------------------------------------------


def run_logged(argv: list[str], log: Any, log_path: Path, on_line: Callable[[str], None]) -> None:
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


def reporter(progress: Callable[[str], None]) -> Callable[[str], None]:
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
