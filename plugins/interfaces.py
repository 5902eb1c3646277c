"""The interfaces plugins implement: GPU observers and engines, and the data they exchange.

The engine interface is small and async and shaped after llama.cpp's `llama-server`: a replica
is one engine process on one device mask, reached over loopback HTTP. Closing the iterator
returned by `generate` (``aclose()``) cancels the generation: the engine stops producing tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from state import errors, observed

# The two errors that decide orchctl's exit codes live with the others in state.errors; they
# are named here too because plugins raise them (part of the plugin interface).
EnvironmentMissing = errors.EnvironmentMissing
ConfigProblem = errors.ConfigProblem


class GpuObserver(Protocol):
    """Reads the GPUs. `observe` never raises for a single GPU's error; it reports it."""

    name: str
    simulated: bool

    def observe(self) -> observed.GpuSnapshot: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything an engine needs to start one replica. `spec_hash` identifies the config."""

    replica_id: str
    pool_id: str
    engine: str
    model_id: str
    model_ref: str
    model_path: Path | None
    model_size_mib: int
    model_digest: str | None
    devices: tuple[int, ...]
    ctx: int
    slots: int
    spec_hash: str
    state_dir: Path
    flags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # engine-specific (sim: speed, faults)


@dataclass
class ReplicaHandle:
    """A started engine process. `process` is None when the process was adopted after a restart."""

    spec: ReplicaSpec
    pid: int
    port: int
    started_at: float  # process start time (seconds since boot), to tell pid reuse apart
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    base_url: str = ""


ExitKind = Literal["oom", "cuda", "load", "crash", "exit"]


@dataclass(frozen=True)
class ExitInfo:
    """Why an engine process ended: exit code or signal, and a reason read from its log
    (`plugins.exit_reasons` classifies it and gives the fix)."""

    code: int | None
    signal: int | None
    reason: str  # e.g. "exit code 1", "CUDA out of memory: … (exit code 1). Fix: …"
    oom: bool = False
    kind: ExitKind = "exit"
    fix: str | None = None


class EngineStartError(Exception):
    """The engine did not become Ready (exited, timed out, or reported an error)."""

    def __init__(self, reason: str, *, exit: ExitInfo | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit = exit


class EngineStreamError(Exception):
    """The engine failed mid-generation (connection reset, process died, bad frame)."""


class ReplicaStopped(EngineStreamError):
    """The replica was stopped (drained) while the stream was still reading from it."""


class EngineRefused(EngineStreamError):
    """The engine answered the request with an HTTP error status. A 4xx means the request
    itself is wrong for this engine (e.g. the prompt exceeds its context): running it again
    cannot help. A 5xx is the engine's own failure."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"engine answered HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def request_fault(self) -> bool:
        return 400 <= self.status < 500


@dataclass(frozen=True)
class GenerateRequest:
    """One generation. With `chat` (the task's `messages` and chat options as OpenAI-shaped
    JSON: `messages`, `tools`, `tool_choice`, `parallel_tool_calls`, `response_format`) it is a
    chat turn, which the engine renders with the model's chat template; `prompt` is then ""."""

    task_id: str
    prompt: str
    max_tokens: int
    seed: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    chat: Mapping[str, Any] | None = None
    # whether the engine may serve the prompt's start from its slot's KV cache (a session's
    # turn, a chat). Faster, but the cached part was evaluated in other batch shapes, which
    # moves the logits a little: with temperature > 0 the text can differ from a cold run of
    # the same seed. Off, the same seed + prompt gives the same text on a replica, retries too.
    reuse_cache: bool = False


@dataclass(frozen=True)
class Token:
    """A piece of the answer: text, and in a chat the tool-call deltas it carries (OpenAI's
    `delta.tool_calls` items: {index, id?, type?, function: {name?, arguments?}}) or a thinking
    model's reasoning text."""

    text: str
    index: int
    tool_calls: tuple[Mapping[str, Any], ...] = ()
    reasoning: str = ""


FinishReason = Literal["length", "stop", "tool_calls"]


@dataclass(frozen=True)
class Done:
    tokens_out: int
    finish_reason: FinishReason
    timings: Mapping[str, float] = field(default_factory=dict)  # engine's own, e.g. predicted_ms
    prompt_tokens: int | None = None  # the prompt as the engine tokenized it (template included)
    # the context filled before the request's limit: llama-server stopped early, and says so
    truncated: bool = False


@dataclass(frozen=True)
class EngineInfo:
    engine_version: str
    slots_total: int
    slots_busy: int
    model_digest: str | None
    vram_measured_mib: int | None


class Engine(Protocol):
    name: str

    def estimate_vram_mib(self, spec: ReplicaSpec) -> int:
        """Estimated VRAM of one replica (weights + KV for ctx × slots + process overhead)."""
        ...

    async def start(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Spawn the engine process on `spec.devices` in its own process group; do not wait."""
        ...

    async def wait_ready(self, handle: ReplicaHandle, *, timeout_s: float) -> None:
        """Return once the engine answers health checks; raise EngineStartError otherwise."""
        ...

    def generate(
        self, handle: ReplicaHandle, request: GenerateRequest
    ) -> AsyncIterator[Token | Done]:
        """Stream tokens then one Done. Raise EngineStreamError on a fault. aclose() cancels."""
        ...

    async def describe(self, handle: ReplicaHandle) -> EngineInfo: ...

    def poll_exit(self, handle: ReplicaHandle) -> ExitInfo | None:
        """Non-blocking: the exit info when the process has ended, else None."""
        ...

    async def stop(self, handle: ReplicaHandle, *, grace_s: float) -> ExitInfo:
        """SIGTERM the process group, wait `grace_s`, then SIGKILL. Idempotent."""
        ...

    async def adopt(self, record: Mapping[str, Any], spec: ReplicaSpec) -> ReplicaHandle | None:
        """Re-attach to a process recorded by a previous daemon (same pid and start time, and
        healthy), or return None after making sure it is gone."""
        ...
