"""The `llamacpp` engine: one `llama-server` per replica, on the GPUs of its device mask only.

The launcher is here (binary lookup, the GPU-only check, argv, environment, VRAM estimate);
talking to the server is `plugins.llama_server`, shared with the `sim` engine.

GPU-only (HME-013): `start` refuses with EnvironmentMissing unless `llama-server
--list-devices` lists a CUDA device under the replica's CUDA_VISIBLE_DEVICES (a CPU-only build
prints "Available devices: (none)"). The only way around it is the test-only environment
variable LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE=1 of the daemon's own process, read in
`cpu_inference_allowed` alone; no config file or pool env can set it.

`ReplicaSpec.options` for llamacpp (all optional): `engine` (engines.llamacpp as JSON: its
`binary`, `env`, and `provision.ref` as the llama.cpp source or version), or directly `binary`
and `version` (the provisioned build of that source, found by the engine records the
provisioner writes under `~/.cache/llama-orch/llama.cpp/`).

VRAM estimate (`plugins.llamacpp_vram`, whose docstring has the formula):
  weights (the GGUF's tensor bytes) + KV cache (2 × layers × ctx×slots × kv_heads × head_dim ×
  bytes per element of -ctk/-ctv, sliding-window layers holding only their window) + compute
  buffer (flash attention on or off) + 720 MiB process overhead. The geometry is read from
  the model's GGUF header (`plugins.gguf_info`), once per file version.

Start-up: `-lv 4` makes llama-server log its buffer sizes, the memory breakdown and
"offloaded N/M layers to GPU"; `wait_ready` fails the start when N < M (a layer left on the
CPU breaks HME-013), unless the test-only switch is on. Why a process ended is read from its
log by `plugins.exit_reasons`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from plugins import (
    gguf_info,
    gguf_reading,
    hookspecs,
    interfaces,
    llama_server,
    llamacpp_builds,
    llamacpp_sources,
    llamacpp_vram,
    processes,
)

ALLOW_CPU_ENV = "LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE"
CACHE_DIR = Path(".cache") / "llama-orch" / "llama.cpp"  # under the home folder
LIST_DEVICES_TIMEOUT_S = 60.0
_MIB = 1024 * 1024
_DEVICE_LINE = re.compile(r"\s*([A-Za-z][A-Za-z_-]*\d+):\s")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_GPU_ONLY_FIX = (
    "llama-orch runs inference on NVIDIA GPUs only. Build llama.cpp with CUDA (`orchctl up` "
    "configures -DGGML_CUDA=ON) or point engines.llamacpp.binary in orch.yaml at a CUDA build "
    "of llama-server, and check the driver with `nvidia-smi`."
)

_log = logging.getLogger(__name__)


def cpu_switch_set() -> bool:
    """Whether the test-only switch is set; the one place that reads it (from the
    environment). A check that only reports it (`orchctl doctor`) asks this; what lets a
    CPU build serve asks `cpu_inference_allowed`, which also says so, loudly, once."""
    return os.environ.get(ALLOW_CPU_ENV) == "1"


def cpu_inference_allowed() -> bool:
    """The test-only switch, for what acts on it: warns once per process when it is set."""
    if not cpu_switch_set():
        return False
    global _cpu_warned
    if not _cpu_warned:  # once per process: it is asked at every start and sizing
        _cpu_warned = True
        _log.warning(
            "TEST-ONLY: CPU inference enabled by %s=1; llama-server may run without a "
            "GPU. Never set this outside tests.",
            ALLOW_CPU_ENV,
        )
    return True


_cpu_warned = False


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _engine_config(options: Mapping[str, Any]) -> Mapping[str, Any]:
    engine = options.get("engine")
    return engine if isinstance(engine, Mapping) else {}


def find_binary(
    options: Mapping[str, Any], *, home: Path | None = None, search_path: str | None = None
) -> Path:
    """engines.llamacpp.binary, else the provisioned build, else `llama-server` on PATH."""
    engine = _engine_config(options)
    provision = engine.get("provision") if isinstance(engine.get("provision"), Mapping) else {}
    explicit = options.get("binary") or engine.get("binary")
    if explicit:
        path = Path(str(explicit)).expanduser()
        if _executable(path):
            return path
        raise interfaces.EnvironmentMissing(
            f"engine binary {path} does not exist or is not executable",
            "fix engines.llamacpp.binary in orch.yaml, or remove it and run `orchctl up` to "
            "build llama.cpp with CUDA",
        )
    cache = (home if home is not None else Path.home()) / CACHE_DIR
    version = options.get("version") or (provision or {}).get("ref")
    # the provisioner's builds, newest first, by their records; CPU-only builds (tests) last
    builds = [b for b in llamacpp_builds.find_builds(cache) if b.backend != "cpu"]
    if version:
        candidates = [cache / str(version) / "bin" / "llama-server"]  # a folder named so
        with contextlib.suppress(ValueError):
            wanted = str(llamacpp_sources.parse(str(version)))
            candidates += [Path(b.path) for b in builds if b.source == wanted]
    else:
        candidates = [Path(b.path) for b in builds] + sorted(
            (p for p in cache.glob("*/bin/llama-server") if _executable(p)),
            key=lambda p: (llamacpp_builds.cpu_only(p), -p.stat().st_mtime),
        )
    for candidate in candidates:
        if _executable(candidate):
            return candidate
    found = shutil.which("llama-server", path=search_path)
    if found:
        return Path(found)
    raise interfaces.EnvironmentMissing(
        f"llama-server not found (engines.llamacpp.binary unset, nothing under {cache}, "
        "not on PATH)",
        "run `orchctl up` to build llama.cpp with CUDA, or set engines.llamacpp.binary in "
        "orch.yaml to a CUDA build of llama-server",
    )


def parse_list_devices(output: str) -> list[str] | None:
    """The device lines after "Available devices:", or None when the marker is missing."""
    _, marker, rest = output.partition("Available devices:")
    if not marker:
        return None
    return [line.strip() for line in rest.splitlines() if _DEVICE_LINE.match(line)]


async def list_devices(binary: Path, *, env: Mapping[str, str]) -> list[str]:
    """Run `llama-server --list-devices`; raise EnvironmentMissing when that fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            str(binary),
            "--list-devices",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
        )
    except OSError as e:
        raise interfaces.EnvironmentMissing(f"cannot run {binary}: {e}", _GPU_ONLY_FIX) from e
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), LIST_DEVICES_TIMEOUT_S)
    except TimeoutError as e:
        proc.kill()
        await proc.wait()
        raise interfaces.EnvironmentMissing(
            f"{binary} --list-devices did not finish in {LIST_DEVICES_TIMEOUT_S:g} s", _GPU_ONLY_FIX
        ) from e
    text = out.decode("utf-8", errors="replace")
    listed = parse_list_devices(text)
    if listed is None:
        tail = text.strip().splitlines()[-1:] or ["no output"]
        raise interfaces.EnvironmentMissing(
            f"{binary} --list-devices printed no device list (exit {proc.returncode}: "
            f"{tail[0][:200]})",
            _GPU_ONLY_FIX,
        )
    return listed


def offloaded_layers(log_text: str) -> tuple[int, int] | None:
    """(N, M) of the last "offloaded N/M layers to GPU" llama.cpp logged, None when absent."""
    found = _OFFLOADED.findall(log_text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def command(spec: interfaces.ReplicaSpec, *, binary: Path, port: int) -> list[str]:
    """llama-server's argv: `-c` is the context of all slots together, so ctx × slots; all
    layers on the GPU and `--fit off`, so llama-server never quietly shrinks or moves them."""
    if spec.model_path is None:
        raise interfaces.EngineStartError(
            f"model {spec.model_id} ({spec.model_ref}) has no local file to load"
        )
    return [
        str(binary),
        "-m",
        str(spec.model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(spec.ctx * spec.slots),
        "-np",
        str(spec.slots),
        "-ngl",
        "999",
        "--fit",
        "off",
        "--metrics",
        "-lv",
        "4",  # buffer sizes, the memory breakdown and the offload count, for exit reasons
        *spec.flags,
    ]


def child_env(spec: interfaces.ReplicaSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment plus the pool's, without LLAMA_ARG_* (they override flags),
    on the replica's GPUs numbered as nvidia-smi/NVML number them (PCI bus order)."""
    engine_env = _engine_config(spec.options).get("env") or {}
    env = processes.scrub_env({**base, **engine_env, **spec.env})
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in spec.devices)
    return env


_ModelKey = tuple[str, int, int, int]

_OFFLOAD_FIX = (
    "llama-orch serves from GPUs only (HME-013). Remove -ngl/--n-gpu-layers, --fit and "
    "--cpu-moe style flags from the pool's flags (llama-orch passes -ngl 999 --fit off), and "
    "check with `orchctl status` that the GPU has room for the whole model"
)


class LlamaCppEngine(llama_server.ServerEngine):
    name = "llamacpp"

    def __init__(self) -> None:
        self._gpu_checked: set[tuple[str, int, str]] = set()
        # GGUF geometry per file version (path, mtime, size, inode): planning asks every pass
        self._models: dict[_ModelKey, gguf_info.ModelInfo | gguf_reading.GgufError] = {}

    def model_info(self, path: Path) -> gguf_info.ModelInfo:
        """The GGUF's geometry, read once per version of the file; GgufError when unusable."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, st.st_ino)
        found = self._models.get(key)
        if found is None:
            try:
                found = gguf_info.inspect(path)
            except gguf_reading.GgufError as e:
                found = e
                _log.warning("cannot size %s from its header: %s", path, e)
            self._models = {k: v for k, v in self._models.items() if k[0] != key[0]}
            self._models[key] = found
        if isinstance(found, gguf_reading.GgufError):
            raise found
        return found

    def estimate_vram_mib(self, spec: interfaces.ReplicaSpec) -> int:
        """The estimate of `plugins.llamacpp_vram` with the model file's geometry, or with its
        default geometry and models.<id>.size_mib while there is no readable file."""
        model = None
        if spec.model_path is not None:
            with contextlib.suppress(OSError, gguf_reading.GgufError):
                model = self.model_info(spec.model_path)
        return llamacpp_vram.estimate_mib(
            model, spec.flags, ctx=spec.ctx, slots=spec.slots, size_mib=spec.model_size_mib
        )

    async def require_gpu(self, binary: Path, spec: interfaces.ReplicaSpec) -> None:
        """Raise EnvironmentMissing unless the binary sees a CUDA device of the mask."""
        if cpu_inference_allowed():
            return
        env = child_env(spec, os.environ)
        key = (str(binary), binary.stat().st_mtime_ns, env["CUDA_VISIBLE_DEVICES"])
        if key in self._gpu_checked:
            return
        listed = await list_devices(binary, env=env)
        if not any(line.startswith("CUDA") for line in listed):
            raise interfaces.EnvironmentMissing(
                f"{binary} lists no CUDA device (Available devices: "
                f"{'; '.join(listed) or '(none)'}; CUDA_VISIBLE_DEVICES="
                f"{env['CUDA_VISIBLE_DEVICES']})",
                _GPU_ONLY_FIX,
            )
        self._gpu_checked.add(key)

    async def start(self, spec: interfaces.ReplicaSpec) -> interfaces.ReplicaHandle:
        binary = find_binary(spec.options)
        await self.require_gpu(binary, spec)
        if spec.model_path is not None:
            if not spec.model_path.is_file():
                raise interfaces.EngineStartError(f"model file not found: {spec.model_path}")
            try:  # a bad file is refused here, with its reason, not by a crashing engine
                await asyncio.to_thread(self.model_info, spec.model_path)
            except gguf_reading.GgufError as e:
                raise interfaces.EngineStartError(
                    f"model file is not a usable GGUF: {e}. Fix: fetch the file again (set "
                    f"models.{spec.model_id}.digest to catch a bad copy) or point "
                    f"models.{spec.model_id}.ref at a GGUF; then POST "
                    f"/v1/catalog/models/{spec.model_id}/verify starts the pool again at once"
                ) from e
        port = processes.free_port()
        return await processes.launch(
            spec,
            argv=command(spec, binary=binary, port=port),
            env=child_env(spec, os.environ),
            port=port,
        )

    async def wait_ready(self, handle: interfaces.ReplicaHandle, *, timeout_s: float) -> None:
        await super().wait_ready(handle, timeout_s=timeout_s)
        self.require_all_layers_on_gpu(handle)

    async def adopt(
        self, record: Mapping[str, Any], spec: interfaces.ReplicaSpec
    ) -> interfaces.ReplicaHandle | None:
        """A recorded engine passes the checks of a start before it is adopted: a CPU build
        (started by a daemon with the test-only switch) or layers left on the CPU are not
        served by a daemon without it. One that fails them is stopped; the pool's start then
        says why."""
        handle = await super().adopt(record, spec)
        if handle is None:
            return None
        try:
            await self.require_gpu(find_binary(spec.options), spec)
            self.require_all_layers_on_gpu(handle)
        except (interfaces.EnvironmentMissing, interfaces.EngineStartError, OSError) as exc:
            _log.warning(
                "not adopting %s (pid %s): %s",
                spec.replica_id,
                handle.pid,
                getattr(exc, "reason", None) or getattr(exc, "what", None) or exc,
            )
            await processes.stop_replica(handle, grace_s=self.adopt_stop_grace_s)
            return None
        return handle

    def require_all_layers_on_gpu(self, handle: interfaces.ReplicaHandle) -> None:
        """Raise EngineStartError when llama-server logged fewer layers on the GPU than the
        model has (the test-only CPU switch allows it). Without the line (a verbosity flag in
        the pool's flags hid it), the start goes on with a warning."""
        try:
            text = handle.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        counted = offloaded_layers(text)
        if counted is None:
            if not cpu_inference_allowed():
                _log.warning(
                    "%s: llama-server logged no 'offloaded N/M layers to GPU' line (see %s); "
                    "cannot confirm every layer is on the GPU",
                    handle.spec.replica_id,
                    handle.log_path,
                )
            return
        on_gpu, layers = counted
        if on_gpu < layers and not cpu_inference_allowed():
            raise interfaces.EngineStartError(
                f"llama-server left {layers - on_gpu} of {layers} layers on the CPU "
                f"(offloaded {on_gpu}/{layers} layers to GPU). Fix: {_OFFLOAD_FIX}"
            )


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("llamacpp", LlamaCppEngine())


plugin = _Plugin()
