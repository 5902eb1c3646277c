"""OpenAI requests as task files: the mapping of `POST /v1/chat/completions` and
`POST /v1/completions` bodies onto `state.tasks.TaskFile`. Pure: plain data in, a task or a
refusal out.

`reconciler.api_openai` calls `plan` for every request. Rules it keeps:
- Every field is either mapped onto the task (`FIELDS`), accepted because its value asks for
  nothing this server would do differently (`NEUTRAL`: `n: 1`, penalties of 0, ...), or
  refused with a 400 naming it. A field given as null counts as absent, as in OpenAI's API.
  Nothing is dropped silently.
- `model` is a model id of orch.yaml (or a pool id, which pins the pool).
- `max_tokens` (or `max_completion_tokens`) defaults to what the largest pool serving the
  model leaves after the prompt, capped by its `max_tokens`, as llama-server's own default
  (generate until the context is full) would.
- With no `max_tokens` in a session that has a token budget, no more than the budget has left.
- The session is the `X-Session-Id` header, else the `user` field (an unsafe `user` value is
  hashed into a safe id), so a conversation's turns stay on the replica whose KV cache holds it.
- A `developer` message is a `system` message (llama.cpp's chat templates know no other).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pydantic

from state import desired, ids, loading, parsing, sessions, tasks
from state.errors import ErrorCode

Kind = Literal["chat", "text"]
MAX_TOKENS = 1_000_000  # the task file's bound
DEFAULT_MAX_TOKENS = 256  # when no pool serves the model (admission refuses it anyway)

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "user",
    }
)
FIELDS: dict[Kind, frozenset[str]] = {
    "chat": _COMMON
    | {
        "messages",
        "max_completion_tokens",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
    },
    "text": _COMMON | {"prompt"},
}
# Fields accepted when they ask for what this server does anyway (OpenAI's defaults).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logprobs": (False,),
    "logit_bias": ({},),
    "store": (False,),
    "echo": (False,),
    "best_of": (1,),
}
# Where a task field came from, to name the request's field in a refusal.
_ORIGIN = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "session_id": "user",
}


PARAM_SHOWN = 120  # the most characters of a field's name an error shows


class Refused(Exception):
    """The request cannot become a task; `param` names the field (OpenAI's `error.param`)."""

    def __init__(
        self,
        param: str | None,
        message: str,
        *,
        code: ErrorCode = ErrorCode.INVALID_PARAMS,
        hint: str | None = None,
    ) -> None:
        # a field's name is the client's text, of any length: shown abridged, as values are
        if param is not None and len(param) > PARAM_SHOWN:
            shown = parsing.shortened(param, PARAM_SHOWN)
            message = message.replace(param, shown)
            hint = hint.replace(param, shown) if hint is not None else None
            param = shown
        super().__init__(message)
        self.param = param
        self.message = message
        self.code = code
        # what to do: said where it is known, else the field to fix named
        self.hint = hint or (f"fix `{param}` and send the request again" if param else None)


@dataclass(frozen=True)
class Plan:
    task: tasks.TaskFile
    stream: bool
    include_usage: bool


def plan(
    body: Any,
    *,
    kind: Kind,
    task_id: str,
    state: desired.DesiredState,
    session_header: str | None = None,
    correlation_id: str | None = None,
    tokens_left: Callable[[str], int | None] = lambda session_id: None,
) -> Plan:
    if not isinstance(body, dict):
        raise Refused(
            None,
            "the body must be a JSON object",
            hint='send e.g. {"model": "<id from GET /v1/models>", "messages": [...]}',
        )
    given = {k: v for k, v in body.items() if v is not None}
    for name, value in given.items():
        if name not in FIELDS[kind] and not _neutral(name, value):
            message, fix = _unsupported(name, value, kind)
            raise Refused(name, message, hint=fix)
    stream = _flag(given, "stream")
    options = given.get("stream_options", {})
    if not isinstance(options, dict):
        raise Refused("stream_options", "stream_options: an object, such as {include_usage: true}")
    if options and not stream:  # as OpenAI answers: there is no stream to shape
        raise Refused(
            "stream_options",
            "stream_options: only allowed when stream is true",
            hint="add stream: true, or remove stream_options",
        )
    # include_obfuscation pads chunks against length side channels: nothing to do on a
    # local server, and a client setting it false (or true) is served the same
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise Refused(
            f"stream_options.{unknown[0]}",
            f"stream_options.{unknown[0]}: unsupported; include_usage and include_obfuscation are",
        )
    if not isinstance(options.get("include_obfuscation", False), bool):
        raise Refused(
            "stream_options.include_obfuscation",
            "stream_options.include_obfuscation: must be true or false",
        )
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):  # not read as false: refused
        raise Refused(
            "stream_options.include_usage", "stream_options.include_usage: must be true or false"
        )
    include_usage = stream and usage is True
    task: dict[str, Any] = {
        "task_id": task_id,
        "max_tokens": 1,  # replaced below, once the prompt's size is known
        "labels": {
            tasks.API_LABEL: f"openai.{'chat.completions' if kind == 'chat' else 'completions'}"
        },
        "correlation_id": correlation_id,
        **_target(given, state),
        **_sampling(given),
        **_session(given, session_header),
    }
    if "session_id" in task and session_header is None:  # from `user`: it starts over
        task["labels"][sessions.FROM_LABEL] = sessions.FROM_OPENAI_USER
    if "stop" in given:
        task["stop"] = _stop(given["stop"])
    if kind == "chat":
        task.update(_chat(given))
    else:
        task["prompt"] = _prompt(given)
    checked = _validate(task)
    max_tokens = _max_tokens(given)
    if max_tokens is None:
        # the client set no limit: the context's end is one, as OpenAI's own is
        checked.labels[tasks.UP_TO_CONTEXT[0]] = tasks.UP_TO_CONTEXT[1]
        max_tokens = default_max_tokens(checked, state)
        # a session with a token budget: no more than it has left (none left: the default,
        # which admission refuses naming the budget)
        left = tokens_left(checked.session_id) if checked.session_id else None
        if left:
            max_tokens = min(max_tokens, left)
    checked.max_tokens = max_tokens
    return Plan(checked, stream, include_usage)


def _neutral(name: str, value: Any) -> bool:
    # of the same JSON type: `n: 1.0` and `echo: 0` are not `n: 1` and `echo: false` (as
    # `max_tokens: 1.0` is no integer either)
    return any(
        value == allowed and type(value) is type(allowed) for allowed in NEUTRAL.get(name, ())
    )


def _unsupported(name: str, value: Any, kind: Kind) -> tuple[str, str]:
    """Why the field `name` is refused here, and the fix."""
    if name in NEUTRAL:  # in JSON's spelling: true, not Python's True
        only = _json(NEUTRAL[name][0])
        return (
            f"{name}: only {only} is supported, not {_json(value)}",
            f"send {name}: {only}, or leave it out",
        )
    other: Kind = "text" if kind == "chat" else "chat"
    if name in FIELDS[other]:
        where = "/v1/completions" if other == "text" else "/v1/chat/completions"
        return (
            f"{name}: not a field of this endpoint (it belongs to {where})",
            f"remove `{name}`, or send the request to {where}",
        )
    return f"{name}: unsupported field; this server does not implement it", f"remove `{name}`"


def _json(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _flag(given: dict[str, Any], name: str) -> bool:
    value = given.get(name, False)
    if not isinstance(value, bool):
        raise Refused(name, f"{name}: must be true or false")
    return value


def _target(given: dict[str, Any], state: desired.DesiredState) -> dict[str, Any]:
    model = given.get("model")
    if not isinstance(model, str) or not model:
        if model is None or model == "":
            raise Refused("model", "model: required, a model id of orch.yaml (GET /v1/models)")
        raise Refused(
            "model",
            f"model: must be a string, a model id of orch.yaml (GET /v1/models), "
            f"not {_json(model)}",
        )
    if model in state.models:
        return {"model": model}
    if state.pool(model) is not None:
        return {"pool": model}
    raise Refused(
        "model",
        f"model: {ids.quoted(model)} is not served here; {state.use_one_of()}",
        code=ErrorCode.MODEL_UNKNOWN,
        hint="name a model GET /v1/models lists (a model id of orch.yaml, or a pool id)",
    )


def _sampling(given: dict[str, Any]) -> dict[str, Any]:
    sampling = {k: given[k] for k in ("temperature", "top_p", "top_k") if k in given}
    task: dict[str, Any] = {"sampling": sampling} if sampling else {}
    if "seed" in given:
        seed = given["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise Refused("seed", f"seed: must be an integer from 0 to {2**31 - 1}")
        task["seed"] = seed
    return task


def _session(given: dict[str, Any], header: str | None) -> dict[str, Any]:
    if header is not None:
        if not ids.is_safe_id(header):
            raise Refused(
                "X-Session-Id",
                "X-Session-Id: use 1-128 letters, digits, '.', '_' or '-' (no '..')",
            )
        return {"session_id": header}
    user = given.get("user")
    if user is None:
        return {}
    if not isinstance(user, str) or not user:
        raise Refused("user", "user: must be a non-empty string")
    if ids.is_safe_id(user):
        return {"session_id": user}
    return {"session_id": "user-" + hashlib.sha256(user.encode()).hexdigest()[:24]}


def _stop(stop: Any) -> list[str]:
    if stop == "":  # refused as `stop`, the field sent (a list's empty item is `stop[N]`)
        raise Refused("stop", "stop: an empty string stops nothing; leave stop out or give text")
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise Refused("stop", "stop: a string or a list of strings")


def _chat(given: dict[str, Any]) -> dict[str, Any]:
    messages = given.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(
            "messages",
            "messages: required, a non-empty list of messages",
            hint='send e.g. "messages": [{"role": "user", "content": "hi"}]',
        )
    mapped = [_as_input(m) for m in messages]
    for i, message in enumerate(mapped):
        parts = message.get("content") if isinstance(message, dict) else None
        if parts == []:
            raise Refused(
                f"messages[{i}].content",
                f"messages[{i}].content: an empty list of parts",
                hint="give the text as a string, or at least one {type: text, text: ...} part",
            )
        for j, part in enumerate(parts if isinstance(parts, list) else ()):
            if isinstance(part, dict) and part.get("type") != "text":
                raise Refused(
                    f"messages[{i}].content[{j}].type",
                    f"messages[{i}].content[{j}]: only text parts are supported, "
                    f"not {str(part.get('type'))[:40]!r}",
                )
    choice = given.get("tool_choice")
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise Refused(
            "tool_choice",
            "tool_choice: 'none', 'auto', 'required' or {type: function, function: {name}}",
        )
    tools = given.get("tools")
    named = {
        t["function"].get("name")
        for t in (tools if isinstance(tools, list) else ())
        if isinstance(t, dict) and isinstance(t.get("function"), dict)
    }
    if choice == "required" and not named:
        raise Refused("tool_choice", "tool_choice: 'required' needs at least one tool in tools")
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise Refused(
                "tool_choice", "tool_choice: {type: function, function: {name: <a tool's name>}}"
            )
        if name not in named:
            listed = parsing.some_of(sorted(map(str, named)))
            raise Refused(
                "tool_choice",
                f"tool_choice: no tool named {parsing.shortened(name, 60)!r} in tools "
                f"(given: {listed})",
                hint="name one of the tools given, or add that tool to tools",
            )
    chat: dict[str, Any] = {"messages": mapped}
    for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format"):
        if name in given:
            chat[name] = given[name]
    return chat


# what an answer's message carries besides the conversation itself: sent back as the next
# request's history (the SDKs' way: messages.append(choice.message)), it is not refused
_ECHOED = ("refusal", "annotations", "audio", "function_call")


def _as_input(message: Any) -> Any:
    """A message as the task takes it: `developer` is a system message, a field given as
    null counts as absent (docs/http.md), and what an answer's message carries beside its
    content (a refusal, annotations, null audio or function_call) is read as it would be
    written: a refusal's text is the assistant's content."""
    if not isinstance(message, dict):
        return message
    out = {k: v for k, v in message.items() if v is not None}
    if out.get("role") == "developer":
        out["role"] = "system"
    if out.get("role") == "assistant":
        refusal = out.pop("refusal", None)
        if isinstance(refusal, str) and "content" not in out:
            out["content"] = refusal
        if isinstance(out.get("annotations"), list):
            del out["annotations"]
    return out


def _prompt(given: dict[str, Any]) -> str:
    prompt = given.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        raise Refused("prompt", "prompt: one string per request (not a list of prompts or tokens)")
    if not isinstance(prompt, str) or not prompt:
        raise Refused("prompt", "prompt: required, a non-empty string")
    return prompt


def _max_tokens(given: dict[str, Any]) -> int | None:
    both = [given.get("max_tokens"), given.get("max_completion_tokens")]
    if None not in both and both[0] != both[1]:  # which one was meant is not ours to pick
        raise Refused(
            "max_completion_tokens",
            f"max_tokens ({both[0]}) and max_completion_tokens ({both[1]}) differ",
            hint="send one of them (max_completion_tokens is the current name)",
        )
    name = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    value = given.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
        raise Refused(name, f"{name}: must be an integer from 1 to {MAX_TOKENS}")
    return value


def default_max_tokens(task: tasks.TaskFile, state: desired.DesiredState) -> int:
    """The ceiling of a request that set no limit: the largest context of the pools serving
    the task's model, within their max_tokens. The task is labelled UP_TO_CONTEXT, so the
    engine generates until the context is really full (its tokenizer counts the prompt; the
    estimate here is only that) and that end is finish_reason length, as OpenAI's is."""
    model = task.model or (pool.model if (pool := state.pool(task.pool or "")) else None)
    pools = [p for p in state.pools if p.model == model and (not task.pool or p.id == task.pool)]
    if not pools:
        return DEFAULT_MAX_TOKENS
    return max(1, max(min(p.ctx, p.max_tokens or p.ctx) for p in pools))


def _validate(task: dict[str, Any]) -> tasks.TaskFile:
    try:
        return tasks.TaskFile.model_validate(task)
    except pydantic.ValidationError as exc:
        found = loading.plain_errors(exc.errors(include_url=False))
        error = max(found, key=lambda e: len(e["loc"]))  # the deepest is the most specific
        message = str(error["msg"])
        param = _param(error["loc"]) or param_named(message)
        cause = error.get("ctx", {}).get("error")
        hint = cause.hint if isinstance(cause, parsing.Hinted) else None  # the check's own fix
        if error["type"] == "extra_forbidden":
            message = "unsupported field; this server does not implement it"
            hint = f"remove `{param}`" if param else None
        extra = len(found) - 1
        more = f" (and {extra} more problem{'s' if extra > 1 else ''} in the body)" if extra else ""
        # a check's message may name its field itself (`tools: two tools are named 'f'`)
        named = param is not None and message.startswith(param)
        said = message if named else f"{param or 'body'}: {message}"
        raise Refused(param or None, f"{said}{more}", hint=hint) from None


_NAMED = re.compile(r"'?(messages|prompt|tools|max_tokens|model|seed|stop)\b")


def param_named(message: str) -> str | None:
    """The request field a message starts with (`max_tokens: about 25016 prompt tokens ...`,
    `messages and tools hold over 512 KiB`): the `param` of an error raised without one."""
    found = _NAMED.match(message)
    return found.group(1) if found else None


def _param(loc: tuple[int | str, ...]) -> str:
    """A location as OpenAI names a parameter: `messages[0].content`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not part[:1].isupper():  # a model's name: the member of a union it tried
            text += f".{part}" if text else part
    return _ORIGIN.get(text, text)
