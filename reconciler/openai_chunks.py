"""What an OpenAI client reads: chunk objects made from a task's event frames, the whole
answer made from its result, and errors in OpenAI's shape. Pure: plain data in, JSON out.

`reconciler.api_openai` feeds a `Relay` every frame of a streamed request and sends what it
returns as `data:` lines; a non-streamed request gets `whole(...)` of the terminal result.

- Chat chunks (`chat.completion.chunk`): the `started` frame gives the first chunk (`delta:
  {role: assistant, content: ""}`); each `token` frame one chunk whose delta holds its text
  (`content`), tool-call deltas (`tool_calls`) or reasoning (`reasoning_content`); the `end`
  frame a chunk with an empty delta and the `finish_reason`, then, with `include_usage`, one
  with no choices and the `usage` (every earlier chunk then carries `usage: null`).
- Completion chunks (`text_completion`): `choices[0].text` per token, the same ending.
- An `error` frame, or an `end` that says `canceled`, becomes `{"error": {...}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from state import errors, events, results
from state.errors import ErrorCode

Kind = Literal["chat", "text"]

# OpenAI's error `type` for an HTTP status (what its SDKs and llama-server use).
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "unavailable_error",
}
# Codes that end a task after admission and have no HTTP status of their own.
_TASK_ERROR_STATUS = {
    ErrorCode.WORKER_RESET: 503,
    ErrorCode.DECODE_TIMEOUT: 503,
    ErrorCode.CANCELED: 409,
    ErrorCode.INVALID_TASK_FILE: 400,
}


def status_of(envelope: errors.ErrorEnvelope) -> int:
    code = ErrorCode(envelope.code)
    return errors.CODES[code].http_status or _TASK_ERROR_STATUS.get(code, 500)


def error_body(
    envelope: errors.ErrorEnvelope, *, status: int, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's `{"error": {message, type, code, param}}`, with the envelope's other fields
    (`retriable`, `retry_after_ms`, `hint`, `policy_label`) beside them."""
    return {
        "error": {
            "message": envelope.message,
            "type": ERROR_TYPES.get(status)
            or ("invalid_request_error" if 400 <= status < 500 else "server_error"),
            "code": str(envelope.code),
            "param": param,
            "retriable": envelope.retriable,
            "retry_after_ms": envelope.retry_after_ms,
            "hint": envelope.hint,
            "policy_label": envelope.policy_label,
        }
    }


def canceled() -> errors.ErrorEnvelope:
    return errors.envelope(ErrorCode.CANCELED, "the task was canceled before it finished")


@dataclass
class Relay:
    """Turns one task's frames into the chunks a streaming client gets."""

    kind: Kind
    id: str
    model: str
    created: int
    include_usage: bool
    prompt_estimate: int  # usage.prompt_tokens when the engine did not count them
    tokens: int = 0
    fingerprint: str | None = None  # the engine's version, from the `started` frame
    _started: bool = field(default=False, init=False)

    def feed(self, frame: events.EventFrame) -> list[dict[str, Any]]:
        """The chunks for one frame (none for queued and metrics frames)."""
        data = frame.data
        if frame.event == "started" and not self._started:
            self._started = True
            self.fingerprint = data.get("engine_version") or None
            return [self.chunk({"role": "assistant", "content": ""})] if self.kind == "chat" else []
        if frame.event == "token":
            self.tokens += 1
            return [self.chunk(self._delta(data))]
        if frame.event == "end":
            if data.get("finish_reason") == "canceled":
                return [error_body(canceled(), status=409)]
            finish = str(data.get("finish_reason") or "stop")
            out = [self.chunk({} if self.kind == "chat" else "", finish=finish)]
            if self.include_usage:
                tokens = int(data.get("tokens_out") or self.tokens)
                prompt = data.get("prompt_tokens")
                usage = self.usage(self.prompt_estimate if prompt is None else int(prompt), tokens)
                out.append(self.envelope([]) | {"usage": usage})
            return out
        if frame.event == "error":
            envelope = errors.ErrorEnvelope.model_validate(data)
            return [error_body(envelope, status=status_of(envelope))]
        return []

    def _delta(self, data: dict[str, Any]) -> dict[str, Any] | str:
        text = str(data.get("t", ""))
        if self.kind == "text":
            return text
        delta: dict[str, Any] = {}
        if text or not (data.get("tool_calls") or data.get("reasoning")):
            delta["content"] = text
        if data.get("reasoning"):
            delta["reasoning_content"] = data["reasoning"]
        if data.get("tool_calls"):
            delta["tool_calls"] = data["tool_calls"]
        return delta

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = None
        return body

    def chunk(self, delta: dict[str, Any] | str, *, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if isinstance(delta, dict):
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice |= {"logprobs": None, "finish_reason": finish}
        return self.envelope([choice])

    @staticmethod
    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def whole(
    result: results.Result, *, kind: Kind, id: str, model: str, created: int, prompt_estimate: int
) -> dict[str, Any]:
    """The non-streamed answer (`chat.completion` or `text_completion`) of a succeeded task."""
    finish = result.finish_reason or "stop"
    if kind == "chat":
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if result.tool_calls and not result.text else result.text,
            "refusal": None,
        }
        if result.tool_calls:
            message["tool_calls"] = result.tool_calls
        if result.reasoning:
            message["reasoning_content"] = result.reasoning
        choice: dict[str, Any] = {"index": 0, "message": message}
    else:
        choice = {"index": 0, "text": result.text}
    choice |= {"logprobs": None, "finish_reason": finish}
    prompt = result.prompt_tokens if result.prompt_tokens is not None else prompt_estimate
    return {
        "id": id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": result.engine_version,
        "choices": [choice],
        "usage": Relay.usage(prompt, result.tokens_out),
    }
