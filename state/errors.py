"""The one error vocabulary: codes, the error envelope, and the two exception kinds.

The same envelope is written into result files, `error` event frames, `.error.json` files of
quarantined input and (later) HTTP bodies, so a caller handles errors one way everywhere.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict


class ErrorCode(StrEnum):
    INVALID_PARAMS = "INVALID_PARAMS"
    INVALID_TASK_FILE = "INVALID_TASK_FILE"
    DUPLICATE_TASK_ID = "DUPLICATE_TASK_ID"
    DEADLINE_UNMET = "DEADLINE_UNMET"
    MODEL_UNKNOWN = "MODEL_UNKNOWN"
    MODEL_RETIRED = "MODEL_RETIRED"
    UNTRUSTED_ARTIFACT = "UNTRUSTED_ARTIFACT"
    ADMISSION_REJECT = "ADMISSION_REJECT"
    QUEUE_FULL_DROP_LRU = "QUEUE_FULL_DROP_LRU"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    SESSION_TURNS_EXCEEDED = "SESSION_TURNS_EXCEEDED"
    SESSION_BUDGET_EXCEEDED = "SESSION_BUDGET_EXCEEDED"
    POOL_UNREADY = "POOL_UNREADY"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    RELOAD_FAILED = "RELOAD_FAILED"
    WORKER_RESET = "WORKER_RESET"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    CANCELED = "CANCELED"
    INTERNAL = "INTERNAL"
    # the HTTP face's own refusals
    MISSING_TOKEN = "MISSING_TOKEN"
    BAD_TOKEN = "BAD_TOKEN"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    FORBIDDEN_ORIGIN = "FORBIDDEN_ORIGIN"
    DAEMON_STOPPING = "DAEMON_STOPPING"
    SPOOL_UNWRITABLE = "SPOOL_UNWRITABLE"


@dataclass(frozen=True)
class CodeInfo:
    http_status: int | None
    retriable: bool
    hint: str


CODES: dict[ErrorCode, CodeInfo] = {
    ErrorCode.INVALID_PARAMS: CodeInfo(400, False, "Fix the named field and submit again."),
    ErrorCode.INVALID_TASK_FILE: CodeInfo(
        None, False, "Fix the file at the line shown and submit it again (`orchctl validate`)."
    ),
    ErrorCode.DUPLICATE_TASK_ID: CodeInfo(
        409, False, "Give the task a new task_id, or read results/<task_id>.json for the old one."
    ),
    ErrorCode.DEADLINE_UNMET: CodeInfo(
        400, False, "Raise deadline_ms, lower max_tokens, or submit when the queue is shorter."
    ),
    ErrorCode.MODEL_UNKNOWN: CodeInfo(404, False, "Use a model id listed under `models:`."),
    ErrorCode.MODEL_RETIRED: CodeInfo(
        409, False, "Pick an Active model, or set the model's state to Active in orch.yaml."
    ),
    ErrorCode.UNTRUSTED_ARTIFACT: CodeInfo(400, False, "Check the model file's digest."),
    ErrorCode.ADMISSION_REJECT: CodeInfo(
        429, True, "The queue is full; retry after retry_after_ms or raise queue.capacity."
    ),
    ErrorCode.QUEUE_FULL_DROP_LRU: CodeInfo(
        429, True, "Dropped to make room for newer work; resubmit after retry_after_ms."
    ),
    ErrorCode.SESSION_EXPIRED: CodeInfo(409, True, "Start a new session_id."),
    ErrorCode.SESSION_TURNS_EXCEEDED: CodeInfo(409, True, "Start a new session_id."),
    ErrorCode.SESSION_BUDGET_EXCEEDED: CodeInfo(
        409, True, "Start a new session_id or raise sessions.token_budget."
    ),
    ErrorCode.POOL_UNREADY: CodeInfo(
        503, True, "The pool is starting; retry shortly (`orchctl status` shows progress)."
    ),
    ErrorCode.POOL_UNAVAILABLE: CodeInfo(
        503, True, "Add or fix a pool serving this model in orch.yaml (`orchctl status`)."
    ),
    ErrorCode.RELOAD_FAILED: CodeInfo(
        409,
        False,
        "The old orch.yaml is back in place; fix the model file or ref and reload again "
        "(`orchctl status` shows the pool).",
    ),
    ErrorCode.WORKER_RESET: CodeInfo(
        None,
        True,
        "The task's engine stopped under it (a crash, a drain or a restart); "
        "submit the task again.",
    ),
    ErrorCode.DECODE_TIMEOUT: CodeInfo(None, True, "The engine stalled; submit the task again."),
    ErrorCode.CANCELED: CodeInfo(None, False, "The task was canceled on request."),
    ErrorCode.INTERNAL: CodeInfo(
        500, False, "This is a bug in llama-orch home; please report it with the log lines."
    ),
    ErrorCode.MISSING_TOKEN: CodeInfo(
        401, False, "Send `Authorization: Bearer <token>` with the daemon's API token."
    ),
    ErrorCode.BAD_TOKEN: CodeInfo(
        401, False, "Use the token from the daemon's auth.token_env or auth.token_file."
    ),
    ErrorCode.NOT_FOUND: CodeInfo(
        404, False, "Check the id or path (GET /openapi.yaml lists them)."
    ),
    ErrorCode.METHOD_NOT_ALLOWED: CodeInfo(405, False, "Use a method this path accepts."),
    ErrorCode.PAYLOAD_TOO_LARGE: CodeInfo(413, False, "Send a smaller body (at most 1 MiB)."),
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: CodeInfo(
        415, False, "Send the body as JSON with `Content-Type: application/json`."
    ),
    ErrorCode.FORBIDDEN_ORIGIN: CodeInfo(
        403,
        False,
        "Call the API from a program, the status page or the host name it is bound to; "
        "other web sites may not use it (docs/security.md).",
    ),
    ErrorCode.DAEMON_STOPPING: CodeInfo(
        503,
        True,
        "The daemon is stopping (its running tasks finish first); submit again once it is "
        "back (`orchctl serve`), or drop the task file into spool/incoming/ meanwhile.",
    ),
    ErrorCode.SPOOL_UNWRITABLE: CodeInfo(
        503,
        True,
        "The disk refused the task file (full, read-only, no permission): nothing was "
        "delivered; make room on the spool's disk, then submit again.",
    ),
}


class ErrorEnvelope(BaseModel):
    """What every failed or rejected task, frame and response carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: ErrorCode
    message: str
    retriable: bool
    retry_after_ms: int | None = None
    hint: str
    policy_label: str | None = None


def envelope(
    code: ErrorCode,
    message: str,
    *,
    hint: str | None = None,
    retry_after_ms: int | None = None,
    policy_label: str | None = None,
) -> ErrorEnvelope:
    info = CODES[code]
    if hint is None and retry_after_ms is not None and "after retry_after_ms" in info.hint:
        # the delay itself, for whoever reads the hint (`orchctl`, a log), not a field's name
        hint = info.hint.replace("after retry_after_ms", f"in {-(-retry_after_ms // 1000)} s")
    return ErrorEnvelope(
        code=code,
        message=message,
        retriable=info.retriable,
        retry_after_ms=retry_after_ms,
        hint=hint or info.hint,
        policy_label=policy_label,
    )


class EnvironmentMissing(Exception):
    """The driver, NVML or an engine binary is missing; `orchctl` exits 3 and prints `fix`."""

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what = what
        self.fix = fix


class ConfigProblem(Exception):
    """A file the user wrote cannot be used; `orchctl` prints the message and exits 2."""


# the machine out of something every file needs (descriptors, memory): no file's fault, and
# gone again by itself (connections close, memory frees); what failed is retried, never
# refused or failed for it
EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def exhausted(exc: BaseException) -> bool:
    """Whether `exc` is the machine out of descriptors or memory (EXHAUSTION_ERRNOS)."""
    return isinstance(exc, OSError) and exc.errno in EXHAUSTION_ERRNOS
