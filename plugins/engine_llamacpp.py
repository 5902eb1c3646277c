"""The `llamacpp` engine: one `llama-server` per replica, on the GPUs of its device mask only.

The launcher is here (binary lookup, the GPU-only check, argv, environment, VRAM estimate);
talking to the server is `plugins.llama_server`, shared with the `sim` engine.

GPU-only (HME-013): `start` refuses with EnvironmentMissing unless `llama-server
--list-devices` lists a CUDA device under the replica's CUDA_VISIBLE_DEVICES (a CPU-only build
prints "Available devices: (none)"). The only way around it is the test-only environment
variable LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE=1 of the daemon's own process, read in
`cpu_inference_allowed` alone; no config file or pool env can set it.

`ReplicaSpec.options` for llamacpp (all optional): `engine` (engines.llamacpp as JSON: its
`binary`, `env`, and `provision.ref` as the version), or directly `binary` and `version` (the
provisioned llama.cpp version, for `~/.cache/llama-orch/llama.cpp/<version>/bin/`), and the
model geometry when known from the GGUF: `n_layers`, `n_kv_heads`, `head_dim`,
`n_head`; or `kv_mib_per_token` instead of the geometry.

VRAM estimate (checked against /work/shared/fixtures/llama-server/vram-h200-sample.jsonl):
  weights                      model_size_mib (≈ the GGUF size: "CUDA0 model buffer size")
+ KV cache, f16                2 × n_layers × ctx×slots × n_kv_heads × head_dim × 2 bytes
                               (without geometry: ctx×slots × kv_mib_per_token, default
                               0.125 MiB, an 8B llama with GQA)
+ compute buffer               flash attention on (the default): 61 MiB + 1 MiB per 1024 tokens;
                               off: 512 × ctx×slots × n_head (default 32) × 4 bytes + 51 MiB
+ process overhead             720 MiB (CUDA context; ~705 measured, more after a request)
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from plugins import hookspecs, interfaces, llama_server, processes

ALLOW_CPU_ENV = "LLAMA_ORCH_TEST_ALLOW_CPU_INFERENCE"
CACHE_DIR = Path(".cache") / "llama-orch" / "llama.cpp"  # under the home folder
PROCESS_OVERHEAD_MIB = 720
DEFAULT_KV_MIB_PER_TOKEN = 0.125
DEFAULT_N_HEAD = 32
UBATCH = 512
LIST_DEVICES_TIMEOUT_S = 60.0
_MIB = 1024 * 1024
_DEVICE_LINE = re.compile(r"\s*([A-Za-z][A-Za-z_-]*\d+):\s")
_GPU_ONLY_FIX = (
    "llama-orch runs inference on NVIDIA GPUs only. Build llama.cpp with CUDA (`orchctl up` "
    "configures -DGGML_CUDA=ON) or point engines.llamacpp.binary in orch.yaml at a CUDA build "
    "of llama-server, and check the driver with `nvidia-smi`."
)

_log = logging.getLogger(__name__)


def cpu_inference_allowed() -> bool:
    """The test-only switch; the one place that reads it (from the daemon's environment)."""
    if os.environ.get(ALLOW_CPU_ENV) != "1":
        return False
    _log.warning(
        "TEST-ONLY: CPU inference enabled by %s=1; llama-server may run without a "
        "GPU. Never set this outside tests.",
        ALLOW_CPU_ENV,
    )
    return True


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
    if version:
        candidates = [cache / str(version) / "bin" / "llama-server"]
    else:
        candidates = sorted(
            (p for p in cache.glob("*/bin/llama-server") if _executable(p)),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
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


def flash_attention(flags: Sequence[str]) -> bool:
    """Whether the pool's flags leave flash attention on (llama-server's `auto` is on on CUDA)."""
    on = True
    for i, flag in enumerate(flags):
        name, eq, value = flag.partition("=")
        if name in ("-fa", "--flash-attn"):
            if not eq:
                value = flags[i + 1] if i + 1 < len(flags) else "on"
            on = value.lower() not in ("off", "0", "false", "disabled")
        elif name == "--no-flash-attn":
            on = False
    return on


def kv_cache_mib(spec: interfaces.ReplicaSpec) -> int:
    """f16 K and V for every layer and cell: -c is ctx × slots cells."""
    total_ctx = spec.ctx * spec.slots
    o = spec.options
    if all(k in o for k in ("n_layers", "n_kv_heads", "head_dim")):
        layers, kv_heads, head_dim = int(o["n_layers"]), int(o["n_kv_heads"]), int(o["head_dim"])
        return math.ceil(2 * layers * total_ctx * kv_heads * head_dim * 2 / _MIB)
    return math.ceil(total_ctx * float(o.get("kv_mib_per_token", DEFAULT_KV_MIB_PER_TOKEN)))


def compute_buffer_mib(spec: interfaces.ReplicaSpec) -> int:
    total_ctx = spec.ctx * spec.slots
    if flash_attention(spec.flags):
        return 61 + math.ceil(total_ctx / 1024)
    n_head = int(spec.options.get("n_head", DEFAULT_N_HEAD))
    return 51 + math.ceil(UBATCH * total_ctx * n_head * 4 / _MIB)  # the f32 KQ of one ubatch


def estimate_vram_mib(spec: interfaces.ReplicaSpec) -> int:
    """See the module docstring for the formula and where its constants come from."""
    return (
        spec.model_size_mib + kv_cache_mib(spec) + compute_buffer_mib(spec) + PROCESS_OVERHEAD_MIB
    )


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


class LlamaCppEngine(llama_server.ServerEngine):
    name = "llamacpp"

    def __init__(self) -> None:
        self._gpu_checked: set[tuple[str, int, str]] = set()

    def estimate_vram_mib(self, spec: interfaces.ReplicaSpec) -> int:
        return estimate_vram_mib(spec)

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
        if spec.model_path is not None and not spec.model_path.is_file():
            raise interfaces.EngineStartError(f"model file not found: {spec.model_path}")
        port = processes.free_port()
        return await processes.launch(
            spec,
            argv=command(spec, binary=binary, port=port),
            env=child_env(spec, os.environ),
            port=port,
        )


class _Plugin:
    @hookspecs.hookimpl
    def orch_register_engines(self, register: Callable[[str, Any], None]) -> None:
        register("llamacpp", LlamaCppEngine())


plugin = _Plugin()
