"""The sim child's chat answers: what llama-server's `POST /v1/chat/completions` says, decided
up front so `plugins.sim_protocol` only has to pace the pieces out.

`sim_protocol.Server.chat` calls `plan` for each request and `chunk`/`answer` to shape what it
sends. The shapes are llama-server's (see `plugins.llama_chat`); the model is a toy:

- Template: each message becomes `<|role|>` and its text on lines of their own (an assistant's
  tool calls as `<|tool_call|>name arguments`), then `<|assistant|>`. Like the templates that
  take arguments as an object, it parses each call's arguments as JSON first: text that is
  not JSON fails the request with llama-server's 500. The rendered prompt and the seed pick
  the words, as /completion does, so one conversation and seed give one answer.
- Tool calls: with `tools` and a `tool_choice` other than `none`, the answer is one call when
  `tool_choice` is `required` or names a function, or (`auto`, the default) when the last
  message is the user's and names one of the tools. It calls the function named (by
  `tool_choice`, else the first tool the message names, else the first tool), with arguments
  built from its parameters' JSON Schema and the seed, and finishes with `tool_calls`. The
  call streams as a head delta (`id`, `type`, `function.name`), then its arguments 8
  characters per token.
- `response_format` `json_object` or `json_schema`: the content is a JSON object (from the
  schema; else `{"answer": "<words>"}`), 8 characters per token, finishing with `stop`.
- Otherwise one word per token until `max_tokens` (`length`), or until a `stop` string (`stop`,
  the text cut before it; `/completion` uses `cut` too).

Standard library only: the sim child runs without site-packages (`python -S`).
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from plugins import sim_http

PIECE_CHARS = 8  # characters of JSON per token (tool arguments, JSON answers)
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Plan:
    """One chat answer, decided: its pieces (one per token) and how it ends."""

    id: str
    prompt: str
    n_prompt: int
    seed: int
    stream: bool
    include_usage: bool
    pieces: list[dict[str, Any]] = field(default_factory=list)  # `delta` objects
    finish: str = "length"


def _bad(message: str) -> sim_http.HttpError:
    return sim_http.HttpError(400, message, "invalid_request_error")


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    raise _bad("message content must be a string or a list of parts")


def render(messages: Any) -> str:
    """The sim's chat template."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array")
    lines: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(f"each message needs a role, one of {', '.join(ROLES)}")
        lines += [f"<|{message['role']}|>", _text(message.get("content"))]
        for call in message.get("tool_calls") or ():
            function = call.get("function", {}) if isinstance(call, dict) else {}
            arguments = function.get("arguments")
            try:
                json.loads(arguments) if isinstance(arguments, str) else None
            except ValueError as exc:
                raise sim_http.HttpError(
                    500, f"Failed to parse tool call arguments as JSON: {exc}", "server_error"
                ) from None
            lines.append(f"<|tool_call|>{function.get('name')} {arguments}")
    lines.append("<|assistant|>")
    return "\n".join(lines) + "\n"


def source(seed: int, prompt: str) -> random.Random:
    """The deterministic token source of one request (as /completion's)."""
    return random.Random(hashlib.sha256(f"{seed}\n{prompt}".encode()).digest())


def words(rng: random.Random, n: int, vocabulary: tuple[str, ...]) -> list[str]:
    return [" " + vocabulary[rng.randrange(len(vocabulary))] for _ in range(n)]


def cut(pieces: list[str], stop: list[str]) -> tuple[list[str], bool]:
    """The pieces up to the first stop string (the piece holding it shortened), and whether
    one was found."""
    text = "".join(pieces)
    found = [text.find(s) for s in stop if s and s in text]
    if not found:
        return pieces, False
    end = min(found)
    kept, at = [], 0
    for piece in pieces:
        if at + len(piece) > end:
            if end > at:
                kept.append(piece[: end - at])
            break
        kept.append(piece)
        at += len(piece)
    return kept, True


def value(schema: Any, rng: random.Random, vocabulary: tuple[str, ...]) -> Any:
    """A value for a JSON Schema, drawn from `rng`."""
    if not isinstance(schema, dict):
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][rng.randrange(len(schema["enum"]))]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        return {k: value(v, rng, vocabulary) for k, v in props.items() if isinstance(k, str)}
    if kind == "array":
        return [value(schema.get("items"), rng, vocabulary)]
    if kind == "integer":
        return rng.randrange(100)
    if kind == "number":
        return round(rng.random() * 100, 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "string":
        return vocabulary[rng.randrange(len(vocabulary))]
    return None


def _slices(text: str) -> list[str]:
    return [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)] or [""]


def _tool_to_call(body: dict[str, Any], last: dict[str, Any]) -> dict[str, Any] | None:
    given = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict)]
    tools: list[dict[str, Any]] = [
        f for f in given if isinstance(f, dict) and isinstance(f.get("name"), str)
    ]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((f for f in tools if f["name"] == wanted), None)
    if choice == "required":
        return tools[0]
    if last.get("role") != "user":
        return None
    asked = _text(last.get("content")).lower()
    named = [f for f in tools if f["name"].lower() in asked]
    return min(named, key=lambda f: asked.index(f["name"].lower())) if named else None


def plan(body: dict[str, Any], *, ctx: int, vocabulary: tuple[str, ...], count: Any) -> Plan:
    """Check the request and decide the whole answer. `count` is the sim's token counter."""
    prompt = render(body.get("messages"))
    n_prompt = count(prompt)
    if n_prompt >= ctx:
        raise sim_http.HttpError(
            400,
            "the request exceeds the available context size, try increasing it",
            "exceed_context_size_error",
        )
    wanted = body.get("max_completion_tokens", body.get("max_tokens", body.get("n_predict")))
    room = ctx - n_prompt
    n = room if wanted is None or int(wanted) < 0 else min(int(wanted), room)
    seed = int(body.get("seed", -1))
    if seed < 0:
        seed = random.SystemRandom().randrange(2**32)
    options = body.get("stream_options") or {}
    answer = Plan(
        id="chatcmpl-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:32],
        prompt=prompt,
        n_prompt=n_prompt,
        seed=seed,
        stream=bool(body.get("stream", False)),
        include_usage=bool(options.get("include_usage", False)),
    )
    rng = source(seed, prompt)
    function = _tool_to_call(body, body["messages"][-1])
    fmt = body.get("response_format") or {}
    if function is not None:
        # a function without parameters is called with {} (as llama-server does), not null
        parameters = function.get("parameters") or {"type": "object"}
        arguments = json.dumps(value(parameters, rng, vocabulary))
        head = {
            "index": 0,
            "id": f"call_{rng.getrandbits(64):016x}",
            "type": "function",
            "function": {"name": function["name"], "arguments": ""},
        }
        answer.pieces = [{"tool_calls": [head]}] + [
            {"tool_calls": [{"index": 0, "function": {"arguments": part}}]}
            for part in _slices(arguments)
        ]
        answer.finish = "tool_calls"
    elif fmt.get("type") in ("json_object", "json_schema"):
        schema = (fmt.get("json_schema") or {}).get("schema")
        data = value(schema, rng, vocabulary) if schema else None
        if not isinstance(data, dict):
            data = {"answer": "".join(words(rng, 3, vocabulary)).strip()}
        answer.pieces = [{"content": part} for part in _slices(json.dumps(data))]
        answer.finish = "stop"
    else:
        stop = body.get("stop") or []
        texts, stopped = cut(words(rng, n, vocabulary), [stop] if isinstance(stop, str) else stop)
        answer.pieces = [{"content": t} for t in texts]
        answer.finish = "stop" if stopped else "length"
    if len(answer.pieces) > n:
        answer.pieces, answer.finish = answer.pieces[:n], "length"
    return answer


def chunk(
    answer: Plan, model: str, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": int(time.time()),
        "id": answer.id,
        "model": model,
        "system_fingerprint": "sim",
        "object": "chat.completion.chunk",
    }


def usage(answer: Plan, n: int) -> dict[str, Any]:
    return {
        "completion_tokens": n,
        "prompt_tokens": answer.n_prompt,
        "total_tokens": answer.n_prompt + n,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def answer_json(
    answer: Plan, model: str, pieces: list[dict[str, Any]], timings: dict[str, Any]
) -> dict[str, Any]:
    """The whole non-streamed answer (`object: chat.completion`)."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    text = "".join(p.get("content", "") for p in pieces)
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        for delta in piece.get("tool_calls", ()):
            if "id" in delta:
                calls.append({**delta, "function": dict(delta["function"])})
            else:
                calls[-1]["function"]["arguments"] += delta["function"]["arguments"]
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    else:
        message["content"] = text
    return {
        "choices": [{"finish_reason": answer.finish, "index": 0, "message": message}],
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "sim",
        "object": "chat.completion",
        "usage": usage(answer, len(pieces)),
        "id": answer.id,
        "timings": timings,
    }
