"""The desired state: pydantic models of orch.yaml, and loading it with located errors.

The config watcher and `orchctl validate` call `load_desired`. Paths inside the file are
resolved relative to the file's own folder, so a config works from any working directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from state import ids, loading, parsing, spool
from state.parsing import Hinted

Id = Annotated[str, Field(pattern=ids.ID_PATTERN), AfterValidator(ids.check_safe_id)]


class Strict(BaseModel):
    # values are taken as written: `ttl_s: "600"` or `replicas: true` is an error, not converted
    model_config = ConfigDict(extra="forbid", strict=True)


class ServerConfig(Strict):
    bind: str = Field(
        "127.0.0.1:8080",
        description="host:port the HTTP API listens on; loopback by default (HME-002); "
        "port 0 picks a free port. A non-loopback bind needs an API token",
    )
    public_url: str | None = None

    @field_validator("bind")
    @classmethod
    def _host_and_port(cls, bind: str) -> str:
        problem = bind_problem(bind)
        if problem is not None:
            raise Hinted(problem, "write host:port, e.g. 127.0.0.1:8080 (port 0 to 65535)")
        return bind


def bind_problem(bind: str) -> str | None:
    """Why `bind` is not host:port with a port of 0 to 65535 (an IPv6 host in brackets)."""
    host, _, port = bind.rpartition(":")
    if not host.strip("[]") or not (port.isascii() and port.isdigit()) or len(port) > 5:
        return f"{bind[:80]!r} is not host:port; write e.g. 127.0.0.1:8080 (port 0: any free one)"
    if int(port) > 65535:
        return f"port {port} is over 65535; write e.g. 127.0.0.1:8080 (port 0: any free one)"
    return None


class AuthConfig(Strict):
    token_env: str = Field("AUTH_TOKEN", description="environment variable holding the token")
    token_file: str | None = Field(None, description="or a file holding the token")
    optional_on_loopback: bool = True


class PathsConfig(Strict):
    spool: str = "spool"
    results: str = "results"
    artifacts: str = "artifacts"
    catalog: str = "catalog"
    state: str = Field(".orch", description="status.json, sessions and engine bookkeeping")


class GpusConfig(Strict):
    observer: Literal["nvml", "simulated"] = "nvml"
    inventory: str | None = Field(None, description="simulated GPUs: path of an inventory file")
    reserve_mib: int = Field(512, ge=0, le=1_048_576, description="VRAM kept free on every GPU")
    poll_s: float = Field(2.0, gt=0, le=60)

    @model_validator(mode="after")
    def _inventory_for_simulated(self) -> GpusConfig:
        if self.observer == "simulated" and not self.inventory:
            raise Hinted(
                "observer 'simulated' needs 'inventory: <file>' listing the GPUs",
                "add inventory: inventory.yaml (`orchctl init --simulate` writes one), or use "
                "observer: nvml on a machine with NVIDIA GPUs",
            )
        return self


class QueueConfig(Strict):
    capacity: int = Field(256, ge=1, le=1_000_000)
    full_policy: Literal["reject", "drop-lru"] = "reject"


class SessionsConfig(Strict):
    ttl_s: float = Field(
        600, gt=0, le=31_536_000, description="a session expires this long after its last use"
    )
    max_turns: int = Field(8, ge=1, le=1_000_000)
    token_budget: int | None = Field(
        None, ge=1, le=10**12, description="tokens out per session, if set"
    )


class TimeoutsConfig(Strict):
    ready_s: float = Field(120, gt=0, le=86_400, description="engine start to Ready, else restart")
    drain_s: float = Field(
        30, ge=0, le=86_400, description="how long in-flight tasks may finish on drain"
    )
    stop_grace_s: float = Field(10, ge=0, le=3_600, description="SIGTERM to SIGKILL")
    decode_idle_s: float = Field(
        60, gt=0, le=86_400, description="no token for this long: DECODE_TIMEOUT"
    )


class ModelSpec(Strict):
    @field_validator("ref")
    @classmethod
    def _names_something(cls, ref: str) -> str:
        scheme, colon, rest = ref.partition(":")
        if colon and not rest.strip():
            raise Hinted(
                f"{ref!r} names no file after {scheme}:",
                f'write {scheme}:<what to load>, e.g. "file:models/x.gguf" or '
                '"hf:org/repo/file.gguf"',
            )
        return ref

    ref: str = Field(
        min_length=1,
        description="file:<path> (a relative path resolves from orch.yaml's folder) | "
        "hf:<org>/<repo>[@<revision>]/<file> | https://… (hf: and https: files are downloaded "
        "into ~/.cache/llama-orch/models; `orchctl plugins` lists the resolvers installed)",
    )
    digest: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="the file's sha256: a file (or download) that differs is refused",
    )
    state: Literal["Active", "Retired"] = "Active"
    size_mib: int | None = Field(
        None, ge=1, le=10**8, description="weights size when no file is at hand"
    )
    ctx_max: int | None = Field(None, ge=1, le=10**8)


class ProvisionSpec(Strict):
    mode: Literal["source", "binary"] = "source"
    ref: str | None = None
    binary: str | None = None


class EngineSpec(Strict):
    provision: ProvisionSpec | None = None
    binary: str | None = None
    env: dict[str, str] = Field(default_factory=dict)


class SimFaults(Strict):
    """Faults the `sim` engine injects, for tests and demos."""

    crash_at_start: bool = False
    hang_before_ready: bool = False
    die_after_tokens: int | None = Field(None, ge=0)
    oom_at_load: bool = False
    ignore_sigterm: bool = False
    leave_child: bool = Field(
        False, description="start a helper process that ignores SIGTERM and outlives the engine"
    )
    extra_vram_mib: int = Field(
        0, ge=0, description="book this much more VRAM than the estimate (a wrong estimate)"
    )


class SimOptions(Strict):
    tokens_per_s: float = Field(200.0, gt=0, le=1e7)
    load_s: float = Field(0.0, ge=0, le=86_400)
    first_token_ms: float = Field(5.0, ge=0, le=3.6e6)
    first_request_extra_ms: float = Field(
        0.0,
        ge=0,
        description="added to the first token of the first request a replica serves, as a "
        "real engine's first request pays for lazy allocations and kernel loading",
    )
    faults: SimFaults = Field(default_factory=SimFaults)


# llama-server flags llama-orch sets itself from the pool (or must not have changed: where
# the engine listens, what it loads, that every layer is on the GPU): given again in `flags`
# they would win (llama-server takes the last value) behind the daemon's back. Each with
# what to write instead.
_SLOTS = "set the pool's slots: (llama-orch passes -np slots)"
_CTX = "set the pool's ctx: (context per slot; llama-orch passes -c ctx × slots)"
_MODEL = "name the model in the pool's model: and its ref in models:"
_ADDRESS = "llama-orch gives each engine a loopback port of its own, reached only by the daemon"
_GPU_ONLY = (
    "llama-orch serves from GPUs only (HME-013) and passes -ngl 999 --fit off; remove it, and "
    "pick GPUs with the pool's devices:"
)
MANAGED_LLAMACPP_FLAGS: dict[str, str] = {
    "-np": _SLOTS,
    "--parallel": _SLOTS,
    "-c": _CTX,
    "--ctx-size": _CTX,
    "-m": _MODEL,
    "--model": _MODEL,
    "-mu": _MODEL,
    "--model-url": _MODEL,
    "-hf": _MODEL,
    "-hfr": _MODEL,
    "--hf-repo": _MODEL,
    "-hff": _MODEL,
    "--hf-file": _MODEL,
    "--host": _ADDRESS,
    "--port": _ADDRESS,
    "--api-key": "the daemon talks to its engines without a key; put auth: on the daemon",
    "--api-key-file": "the daemon talks to its engines without a key; put auth: on the daemon",
    "-ngl": _GPU_ONLY,
    "--gpu-layers": _GPU_ONLY,
    "--n-gpu-layers": _GPU_ONLY,
    "--fit": _GPU_ONLY,
    "-dev": _GPU_ONLY,
    "--device": _GPU_ONLY,
    "-cmoe": _GPU_ONLY,
    "--cpu-moe": _GPU_ONLY,
    "-ncmoe": _GPU_ONLY,
    "--n-cpu-moe": _GPU_ONLY,
    "-ot": _GPU_ONLY,
    "--override-tensor": _GPU_ONLY,
}


class PoolSpec(Strict):
    id: Id
    engine: str
    model: str
    devices: Literal["auto"] | list[Annotated[int, Field(ge=0)]] = Field(
        "auto",
        description="auto: the GPU with the most free VRAM that fits; or GPU indices in PCI "
        "bus order, as nvidia-smi shows them",
    )
    replicas: int = Field(1, ge=0, le=64)
    ctx: int = Field(4096, ge=16, le=10**8, description="context tokens per slot")
    slots: int = Field(1, ge=1, le=256, description="concurrent sequences per replica")
    max_tokens: int | None = Field(
        None, ge=1, le=10**8, description="largest max_tokens a task may ask"
    )
    flags: list[str] = Field(default_factory=list, description="extra engine flags")
    env: dict[str, str] = Field(default_factory=dict, description="extra engine environment")
    sim: SimOptions | None = None

    @field_validator("flags")
    @classmethod
    def _unmanaged_flags(cls, v: list[str], info: ValidationInfo) -> list[str]:
        if info.data.get("engine") != "llamacpp":
            return v
        managed = [f for f in v if f.split("=", 1)[0] in MANAGED_LLAMACPP_FLAGS]
        if len(managed) == 1:
            flag = managed[0]
            raise Hinted(
                f"flag {flag!r} is one llama-orch sets itself for llamacpp pools (given "
                "here too it would win, unseen by the daemon)",
                f"remove it: {MANAGED_LLAMACPP_FLAGS[flag.split('=', 1)[0]]}",
            )
        if managed:  # every one at once: not one a round
            whys = dict.fromkeys(MANAGED_LLAMACPP_FLAGS[f.split("=", 1)[0]] for f in managed)
            raise Hinted(
                f"flags {', '.join(repr(f) for f in managed)} are ones llama-orch sets itself "
                "for llamacpp pools (given here too they would win, unseen by the daemon)",
                f"remove them: {'; '.join(whys)}",
            )
        return v

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, v: Literal["auto"] | list[int]) -> Literal["auto"] | list[int]:
        if isinstance(v, list):
            if not v:
                raise Hinted(
                    "devices must be 'auto' or a non-empty list of GPU indices",
                    "write devices: auto, or a list such as [0] or [0, 1]",
                )
            if len(set(v)) != len(v):
                raise Hinted("devices lists a GPU twice", "list each GPU index once")
        return v


class DesiredState(Strict):
    version: Literal[1] = 1
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    paths: PathsConfig = Field(default_factory=PathsConfig)
    gpus: GpusConfig = Field(default_factory=GpusConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    models: dict[Annotated[str, Field(pattern=ids.ID_PATTERN)], ModelSpec] = Field(
        default_factory=dict
    )
    engines: dict[str, EngineSpec] = Field(default_factory=dict)
    pools: list[PoolSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> DesiredState:
        seen: set[str] = set()
        for i, pool in enumerate(self.pools):
            if pool.id in seen:
                raise Hinted(
                    f"pools[{i}].id: pool id {pool.id!r} is used twice",
                    "give every pool its own id",
                )
            seen.add(pool.id)
            if pool.model not in self.models:
                known = ", ".join(sorted(self.models)) or "none defined"
                raise Hinted(
                    f"pools[{i}].model: {pool.model!r} is not under models: (known: {known})",
                    "add it under models:, or name one of those",
                )
            if pool.sim is not None and pool.engine != "sim":
                raise Hinted(
                    f"pools[{i}].sim: only pools with engine 'sim' take sim options",
                    "remove sim:, or set engine: sim",
                )
        return self

    def pool(self, pool_id: str) -> PoolSpec | None:
        return next((p for p in self.pools if p.id == pool_id), None)

    def served_models(self) -> list[str]:
        """The models a task can name and run on: Active, with a pool (a Retired one is
        refused, one no pool serves too)."""
        pooled = {p.model for p in self.pools}
        return sorted(
            m for m, spec in self.models.items() if spec.state == "Active" and m in pooled
        )

    def use_one_of(self) -> str:
        """The hint for a model that cannot be named: the ones that can."""
        served = self.served_models()
        if served:
            return f"use one of: {', '.join(served)}"
        return "no model of orch.yaml is served: add a pool for one (`orchctl status`)"


class SimulatedGpu(Strict):
    index: int = Field(ge=0)
    name: str
    uuid: str
    vram_total_mib: int = Field(ge=1)
    vram_used_mib: int = Field(0, ge=0, description="used by something outside llama-orch")
    utilization_pct: int = Field(0, ge=0, le=100)
    temperature_c: int = 40


class SimulatedInventory(Strict):
    """A simulated workstation: the GPUs the `simulated` observer reports."""

    gpus: list[SimulatedGpu]


def load_desired(
    path: Path, *, known_engines: set[str] | None = None, content: bytes | None = None
) -> loading.Loaded[DesiredState]:
    """Load orch.yaml (from `content`, its bytes, when the caller has read them already);
    cross-field errors are located at the field they name."""
    result = loading.load_model(path, DesiredState, content=content)
    # the node tree the data was built from: reading the file again could read another file
    node = result.node
    errors = [_locate_cross_field(e, node) for e in result.errors]
    if result.value is not None and known_engines is not None:
        for i, pool in enumerate(result.value.pools):
            if pool.engine not in known_engines:
                line, col = loading.locate(node, ("pools", i, "engine"))
                errors.append(
                    loading.LoadError(
                        str(path),
                        line,
                        col,
                        f"pools[{i}].engine",
                        f"unknown engine {parsing.short(pool.engine)}",
                        f"installed engines: {', '.join(sorted(known_engines))} "
                        "(`orchctl plugins`)",
                    )
                )
    if result.value is not None:
        base = path.parent.resolve()  # orch.yaml's own folder, as the daemon resolves from
        for name, message, hint in path_problems(base, result.value.paths):
            line, col = loading.locate(node, ("paths", name))
            errors.append(loading.LoadError(str(path), line, col, f"paths.{name}", message, hint))
    if errors:
        return loading.Loaded(None, errors, result.data, node)
    return result


def path_problems(base: Path, paths: PathsConfig) -> list[tuple[str, str, str]]:
    """(field, message, hint) for each folder of `paths` that is another one's, or lies in
    a folder whose files the daemon reads name by name (results/, the spool's folders): its
    files would be taken for results or task files (a results folder in spool/incoming had
    the daemon quarantine its own results, each refusal a new result to quarantine), or
    another's file for its own (a result named like a state file, overwritten by it)."""
    where = {
        name: Path(os.path.realpath(resolve(base, getattr(paths, name))))
        for name in PathsConfig.model_fields
    }
    read_by_name = {"results": where["results"]} | {
        f"spool/{sub}": where["spool"] / sub for sub in spool.FOLDERS
    }
    problems: list[tuple[str, str, str]] = []
    defaults = {name: field.default for name, field in PathsConfig.model_fields.items()}
    for name, folder in where.items():
        example = f"for example `{name}: {defaults[name]}`"
        same = [other for other in where if other != name and where[other] == folder]
        if same:
            # one of them keeps it (the first at its default, else the first), every other
            # one is told: the paths the user moved, as a rule
            group = [n for n in where if n == name or n in same]  # in the fields' order
            kept = next((n for n in group if getattr(paths, n) == defaults[n]), group[0])
            if name != kept:
                problems.append(
                    (
                        name,
                        f"{folder} is the folder of paths.{kept} too",
                        f"give paths.{name} a folder of its own, {example}",
                    )
                )
            continue
        for what, scanned in read_by_name.items():
            if what != name and folder.is_relative_to(scanned):
                problems.append(
                    (
                        name,
                        f"{folder} {'is' if folder == scanned else 'lies in'} the "
                        f"{what} folder, whose files the daemon reads as "
                        f"{'results' if what == 'results' else 'task files'}",
                        f"move it out of {what}, {example}",
                    )
                )
                break
    return problems


def _locate_cross_field(error: loading.LoadError, node: Any) -> loading.LoadError:
    """Model-level validators name their field in the message; point the line at it."""
    if error.field:
        return error
    message = error.message
    head, sep, rest = message.partition(": ")
    if not sep or not head or " " in head:
        return loading.LoadError(error.path, error.line, error.column, None, message, error.hint)
    loc = _parse_dotted(head)
    line, col = loading.locate(node, loc)
    return loading.LoadError(error.path, line, col, head, rest, error.hint)


def _parse_dotted(text: str) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for part in text.replace("]", "").replace("[", ".").split("."):
        if part:
            out.append(int(part) if part.isdigit() else part)
    return tuple(out)


def revision_hash(text: bytes) -> str:
    return "sha256:" + hashlib.sha256(text).hexdigest()[:12]


def resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)
