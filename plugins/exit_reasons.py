"""Why an engine process ended, from its exit status and the tail of its log, with a fix.

`plugins.processes.exit_info` calls `classify` whenever a replica's process is found ended
(before Ready or while serving); the reason becomes the replica's `last_error` in status and
the `replica.exited` log line. Pure: it gets the return code and the log's last lines.

The classes, tried in this order (the first whose pattern matches a line of the tail wins,
so a CUDA out-of-memory line is an OOM even though it is also a CUDA error; of its lines the
earliest is quoted, as llama.cpp logs the cause before its consequences):

  oom    CUDA out of memory: the model, KV cache and compute buffer did not fit
  cuda   any other CUDA error (driver too old, no device, illegal memory access)
  load   llama.cpp could not load the model file (corrupt, truncated, unknown architecture)
  crash  killed by a signal we did not send (SIGSEGV, SIGABRT, the kernel's OOM killer)
  exit   any other ending: the exit code and the log's last line

Each class but `exit` carries a fix sentence; the reason reads
"<class>: <log line> (<exit status>). Fix: <sentence>", short enough for status (500 chars).
The patterns are llama.cpp's own messages (ggml-cuda.cu, llama-model-loader.cpp,
llama-context.cpp) and the sim engine's imitations of them.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from plugins import interfaces

EVIDENCE_CHARS = 200


@dataclass(frozen=True)
class Pattern:
    kind: interfaces.ExitKind
    label: str
    regex: re.Pattern[str]
    fix: str


PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "oom",
        "CUDA out of memory",
        re.compile(
            r"out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaMalloc failed"
            r"|alloc_buffer: allocating .* failed"
            r"|failed to allocate CUDA\d* buffer|unable to allocate CUDA\d* buffer"
            r"|failed to allocate compute (pp |tg )?buffers|failed to allocate buffer for kv cache",
            re.IGNORECASE,
        ),
        "the weights, KV cache and compute buffer did not fit in the GPU's free VRAM: lower "
        "ctx or slots, quantize the KV cache (flags: [-ctk, q8_0, -ctv, q8_0]), use a smaller "
        "quantization of the model, or free the GPU (nvidia-smi lists what holds it)",
    ),
    Pattern(
        "cuda",
        "CUDA error",
        re.compile(
            r"CUDA error|cudaError|CUBLAS_STATUS_|ggml_cuda_init: failed"
            r"|no CUDA-capable device|CUDA driver version is insufficient",
            re.IGNORECASE,
        ),
        "check the GPU and driver with nvidia-smi: 'driver version is insufficient' means the "
        "driver is older than the CUDA llama.cpp was built with (update the driver, or rebuild "
        "llama.cpp with `orchctl up`); an illegal memory access or launch failure is an engine "
        "bug: try another llama.cpp version (engines.llamacpp.provision.ref)",
    ),
    Pattern(
        "load",
        "model load failed",
        re.compile(
            r"error loading model|failed to load model|llama_model_load:.*error"
            r"|gguf_init_from_file|invalid magic|unknown model architecture"
            r"|key not found in model|wrong number of tensors|tensor .* is corrupted"
            r"|data is not within the file bounds|unsupported model file",
            re.IGNORECASE,
        ),
        "llama.cpp could not load the model file: check that it is a complete GGUF (fetch it "
        "again; models.<id>.digest catches a bad copy) and that this llama.cpp version knows "
        "its architecture (update it with `orchctl up`)",
    ),
)

CRASH_FIX = (
    "the engine crashed: if the kernel's OOM killer ended it (journalctl -k | grep -i oom), "
    "free host memory; otherwise try another llama.cpp version (engines.llamacpp.provision.ref) "
    "and keep the engine log for a bug report"
)


def status_text(returncode: int | None) -> tuple[int | None, int | None, str]:
    """(code, signal, words) of a return code: "exit code 1", "killed by SIGSEGV"."""
    if returncode is None:
        return None, None, "exit status unknown"
    if returncode < 0:
        sig = -returncode
        try:
            return None, sig, f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return None, sig, f"killed by signal {sig}"
    return returncode, None, f"exit code {returncode}"


def _evidence(line: str) -> str:
    return line if len(line) <= EVIDENCE_CHARS else line[: EVIDENCE_CHARS - 1] + "…"


def crash_fix(engine: str, log_path: object = None) -> str:
    """What to do about a process killed by a signal nobody here sent: llama.cpp's crashes
    may be its own bugs; any engine may have been ended by the OOM killer or another program."""
    log = f"; its log: {log_path}" if log_path else ""
    if engine == "llamacpp":
        return CRASH_FIX + log
    return (
        "the engine process was killed by a signal this daemon did not send (another program, "
        "or the kernel's OOM killer: journalctl -k | grep -i oom); it is restarted with "
        f"backoff{log}"
    )


def classify(
    returncode: int | None,
    tail: Sequence[str],
    *,
    stopped: bool = False,
    engine: str = "llamacpp",
    log_path: object = None,
    model: str | None = None,
) -> interfaces.ExitInfo:
    """The ExitInfo of a process that ended with `returncode` (negative: a signal; None: not
    ours to reap) and whose log ends with `tail`. `stopped`: we sent the signal ourselves,
    so a SIGTERM or SIGKILL is no crash. `model`: the model id its fix names."""
    code, sig, base = status_text(returncode)
    for pattern in PATTERNS:
        line = next((line for line in tail if pattern.regex.search(line)), None)
        if line is not None:
            fix = pattern.fix.replace("models.<id>.", f"models.{model}.") if model else pattern.fix
            return interfaces.ExitInfo(
                code,
                sig,
                f"{pattern.label}: {_evidence(line)} ({base}). Fix: {fix}.",
                oom=pattern.kind == "oom",
                kind=pattern.kind,
                fix=fix,
            )
    if sig is not None and not stopped:
        # a signal's cause is seldom in the log (a kill, the OOM killer): its last line is
        # what the engine was doing, said as that, not as the reason
        last = f" (its log's last line: {_evidence(tail[-1])})" if tail else ""
        fix = crash_fix(engine, log_path)
        return interfaces.ExitInfo(
            code, sig, f"crashed, {base}{last}. Fix: {fix}.", kind="crash", fix=fix
        )
    if code not in (None, 0) and tail:
        return interfaces.ExitInfo(code, sig, f"{base}: {_evidence(tail[-1])}")
    return interfaces.ExitInfo(code, sig, base)
