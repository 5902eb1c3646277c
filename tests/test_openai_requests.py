"""The pure cores of the OpenAI routes: requests mapped onto task files (or refused by name)
and frames turned into OpenAI chunks and answers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import openai_chunks, openai_requests
from state import chats, desired, errors, events, results
from state.errors import ErrorCode
from tests.conftest import config

STATE = desired.DesiredState.model_validate(config())
assert set(STATE.models) == {"m1", "old"} and STATE.models["old"].state == "Retired"
HI = [{"role": "user", "content": "hello"}]


def plan(body: dict[str, Any], kind: openai_requests.Kind = "chat", **kw: Any) -> Any:
    return openai_requests.plan(body, kind=kind, task_id="chatcmpl-1", state=STATE, **kw)


def refusal(body: dict[str, Any], kind: openai_requests.Kind = "chat") -> tuple[str | None, str]:
    with pytest.raises(openai_requests.Refused) as refused:
        plan(body, kind)
    return refused.value.param, refused.value.message


def test_a_chat_request_becomes_a_chat_task_with_its_options() -> None:
    body = {
        "model": "m1",
        "messages": [{"role": "developer", "content": "be brief"}, *HI],
        "max_completion_tokens": 40,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 11,
        "stop": "END",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "required",
        "response_format": {"type": "json_object"},
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "presence_penalty": 0,
        "logprobs": False,
        "metadata": None,  # null is absent
    }
    got = plan(body, correlation_id="c-1")
    task = got.task
    assert got.stream and got.include_usage
    assert task.messages[0].role == "system" and task.max_tokens == 40
    assert (task.sampling.temperature, task.sampling.top_p, task.seed) == (0.5, 0.9, 11)
    assert task.stop == ["END"] and task.tool_choice == "required"
    assert task.correlation_id == "c-1" and task.labels == {"api": "openai.chat.completions"}
    assert task.chat_json()["response_format"] == {"type": "json_object"}


def test_without_max_tokens_the_contexts_end_is_the_limit() -> None:
    """No limit given: the ceiling is the pool's context, and the context's real end (as
    the engine's tokenizer counts the prompt, not this estimate) ends the answer as length."""
    task = plan({"model": "m1", "messages": HI}).task
    assert task.max_tokens == 2048 and task.labels["max_tokens"] == "context"
    text = plan({"model": "m1", "prompt": "x" * 400}, "text").task
    assert text.max_tokens == 2048 and text.prompt == "x" * 400
    given = plan({"model": "m1", "prompt": "x", "max_tokens": 7}, "text").task
    assert given.max_tokens == 7 and "max_tokens" not in given.labels
    pinned = plan({"model": "p1", "prompt": "x"}, "text").task
    assert pinned.pool == "p1" and pinned.model is None


def test_the_session_is_the_header_else_the_user_field() -> None:
    assert plan({"model": "m1", "messages": HI, "user": "ann"}).task.session_id == "ann"
    hashed = plan({"model": "m1", "messages": HI, "user": "ann@example.com"}).task.session_id
    assert hashed.startswith("user-") and "@" not in hashed
    header = plan({"model": "m1", "messages": HI, "user": "ann"}, session_header="s-9")
    assert header.task.session_id == "s-9"
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "m1", "messages": HI}, session_header="../etc")
    assert refused.value.param == "X-Session-Id"


@pytest.mark.parametrize(
    ("body", "kind", "param", "words"),
    [
        ({"n": 3}, "chat", "n", "only 1"),
        ({"frequency_penalty": 0.5}, "chat", "frequency_penalty", "only 0"),
        ({"logprobs": True}, "chat", "logprobs", "only false is supported, not true"),
        ({"n": True}, "chat", "n", "only 1 is supported, not true"),
        ({"logit_bias": {"50256": -100}}, "chat", "logit_bias", 'not {"50256": -100}'),
        ({"response_format": "json_object"}, "chat", "response_format", "should be an object"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "chat",
            "response_format",
            "json_schema.schema: not a valid JSON Schema (at type): 'nonsense'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "chat",
            "tools[0].function.parameters",
            "should be a valid dictionary",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "nonsense"}},
                    }
                ]
            },
            "chat",
            "tools[0].function",
            "the parameters of tool 'f': not a valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}},
                }
            },
            "chat",
            "response_format",
            "$ref '#/$defs/missing' points nowhere in the schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {}, "zzz": 1},
                }
            },
            "chat",
            "response_format",
            "response_format.json_schema.zzz: unsupported key",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n" * 65, "schema": {}},
                }
            },
            "chat",
            "response_format",
            "json_schema.name: 1 to 64 letters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}] * 2},
            "chat",
            "tools",
            "two tools are named 'f'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "42"},
                ]
            },
            "chat",
            "messages",
            "messages[1]: its tool_call_id 'call_9' answers no call",
        ),
        ({"messages": ["hi"]}, "chat", "messages[0]", "should be an object (a mapping"),
        ({"model": 123}, "chat", "model", "must be a string, a model id of orch.yaml"),
        ({"modalities": ["audio"]}, "chat", "modalities", "unsupported field"),
        ({"prompt": "x"}, "chat", "prompt", "/v1/completions"),
        ({"messages": []}, "chat", "messages", "non-empty"),
        ({"model": "nope"}, "chat", "model", "not served here; use one of: m1"),  # not old
        ({"seed": 2**40}, "chat", "seed", "0 to"),
        ({"max_tokens": 0}, "chat", "max_tokens", "from 1"),
        ({"stop": [1]}, "chat", "stop", "strings"),
        ({"stream": "yes"}, "chat", "stream", "true or false"),
        ({"stream": True, "stream_options": {"chunk": 1}}, "chat", "stream_options.chunk", ""),
        ({"stream_options": {"include_usage": True}}, "chat", "stream_options", "stream is true"),
        ({"messages": [{"role": "user", "content": []}]}, "chat", "messages[0].content", "empty"),
        (
            {"max_tokens": 5, "max_completion_tokens": 6},
            "chat",
            "max_completion_tokens",
            "differ",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": "true"}},
            "chat",
            "stream_options.include_usage",
            "true or false",
        ),
        (
            {"stream": True, "stream_options": {"include_usage": 1}},
            "text",
            "stream_options.include_usage",
            "",
        ),
        ({"top_p": 0}, "chat", "top_p", "greater than 0"),
        ({"tool_choice": "sometimes"}, "chat", "tool_choice", ""),
        ({"n": 1.0}, "chat", "n", "only 1 is supported, not 1.0"),
        ({"echo": 0}, "text", "echo", "only false is supported, not 0"),
        ({"stop": ""}, "chat", "stop", "an empty string stops nothing"),
        ({"tool_choice": "required"}, "chat", "tool_choice", "at least one tool"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "chat",
            "tool_choice",
            "no tool named 'nope' in tools (given: 'f')",
        ),
        ({"tool_choice": {"type": "function"}}, "chat", "tool_choice", "function: {name"),
        ({"messages": [{"role": "user"}]}, "chat", "messages[0]", "needs 'content'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "chat", "messages[0]", "tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]},
            "chat",
            "messages[0]",
            "only a 'tool' message may carry 'tool_call_id'",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "audio": 1}]},
            "chat",
            "messages[0].audio",
            "",
        ),
        ({"response_format": {"type": "json_schema"}}, "chat", "response_format", "name"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "text", "tools", ""),
        ({"prompt": ["a", "b"]}, "text", "prompt", "one string"),
        ({"suffix": "}"}, "text", "suffix", "unsupported"),
        ({"echo": True}, "text", "echo", "only false"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_field(
    body: dict[str, Any], kind: openai_requests.Kind, param: str, words: str
) -> None:
    base: dict[str, Any] = {"model": "m1"} | (
        {"messages": HI} if kind == "chat" else {"prompt": "x"}
    )
    got_param, message = refusal(base | body, kind)
    assert got_param == param and words in message, message
    assert "instance of" not in message and "True" not in message, message


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({"parameters": {"properties": {"a": {"const": {"$ref": "#/nope"}}}}}, None),  # data
        ({"parameters": {"properties": {"a": {"$ref": "#anchor"}}}}, None),
        (
            {
                "parameters": {
                    "$id": "https://ex.com/s",
                    "$defs": {"x": {"$id": "x.json", "type": "string"}},
                    "properties": {"a": {"$ref": "x.json"}},  # an embedded resource
                }
            },
            None,
        ),
        ({"parameters": {"allOf": [{}], "properties": {"a": {"$ref": "#/allOf/00"}}}}, "00"),
    ],
)
def test_refs_are_checked_where_they_are_refs_and_only_there(
    extra: dict[str, Any], refused: str | None
) -> None:
    tools = [{"type": "function", "function": {"name": "f"} | extra}]
    if refused is None:
        plan({"model": "m1", "messages": HI, "tools": tools})
        return
    with pytest.raises(openai_requests.Refused) as found:
        plan({"model": "m1", "messages": HI, "tools": tools})
    assert refused in found.value.message


@pytest.mark.parametrize(
    ("messages", "said"),
    [
        ([{"role": "assistant", "tool_calls": [CALL, CALL]}], "'c1' is used twice"),
        (
            [
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "1"},
                {"role": "tool", "tool_call_id": "c1", "content": "2"},
            ],
            "'c1' is answered twice",
        ),
    ],
)
def test_a_tool_call_named_or_answered_twice_is_refused(
    messages: list[dict[str, Any]], said: str
) -> None:
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "m1", "messages": [*HI, *messages]})
    assert said in refused.value.message and refused.value.param == "messages"


def test_a_checks_own_fix_reaches_the_openai_answer_and_its_field_is_named_once() -> None:
    """The task file's checks give their own fix (a tool named twice: give each its own
    name); on the OpenAI routes that fix was replaced by 'fix `tools` and send the request
    again', and the field was named twice ('tools: tools: ...')."""
    tools = [{"type": "function", "function": {"name": "f"}}] * 2
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "m1", "messages": HI, "tools": tools})
    assert refused.value.message == "tools: two tools are named 'f'"
    assert refused.value.hint == "give each tool a name of its own"
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "m1", "messages": HI, "colour": "blue"})
    assert refused.value.hint == "remove `colour`"
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "gpt-4o", "messages": HI})
    assert "GET /v1/models" in (refused.value.hint or "")


def test_an_unknown_model_is_a_404_with_the_models_to_use() -> None:
    with pytest.raises(openai_requests.Refused) as refused:
        plan({"model": "gpt-4o", "messages": HI})
    assert refused.value.code is ErrorCode.MODEL_UNKNOWN and "m1" in refused.value.message


@given(
    st.lists(st.dictionaries(st.sampled_from(["index", "id", "function"]), st.none()), max_size=4)
)
def test_merging_tool_call_deltas_never_fails_on_sparse_deltas(
    deltas: list[dict[str, Any]],
) -> None:
    calls: list[dict[str, Any]] = []
    chats.merge_tool_calls(calls, [{k: v for k, v in d.items() if v is not None} for d in deltas])
    assert all(set(c) == {"id", "type", "function"} for c in calls)


def frame(n: int, event: events.EventName, **data: Any) -> events.EventFrame:
    return events.EventFrame(id=n, event=event, data=data, ts="2026-01-01T00:00:00Z")


def test_a_relay_turns_frames_into_chat_chunks_with_usage_at_the_end() -> None:
    relay = openai_chunks.Relay(
        kind="chat", id="c1", model="m1", created=7, include_usage=True, prompt_estimate=9
    )
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    out = [
        *relay.feed(frame(1, "queued", queue_position=0)),
        *relay.feed(frame(2, "started", pool_id="p1")),
        *relay.feed(frame(3, "token", t="Hi", i=0)),
        *relay.feed(frame(4, "token", t="", i=1, tool_calls=[call])),
        *relay.feed(frame(5, "token", t="", i=2, reasoning="hmm")),
        *relay.feed(frame(6, "metrics", tokens_out=3)),
        *relay.feed(frame(7, "end", tokens_out=3, finish_reason="tool_calls", prompt_tokens=12)),
    ]
    deltas = [c["choices"][0]["delta"] for c in out[:-1]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"tool_calls": [call]},
        {"reasoning_content": "hmm"},
        {},
    ]
    assert out[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["usage"] is None for c in out[:-1])
    assert out[-1]["choices"] == [] and out[-1]["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
    }


def test_errors_and_cancels_become_openai_errors() -> None:
    relay = openai_chunks.Relay(
        kind="text", id="c", model="m1", created=0, include_usage=False, prompt_estimate=1
    )
    reset = errors.envelope(ErrorCode.WORKER_RESET, "engine died", retry_after_ms=1000)
    [body] = relay.feed(frame(1, "error", **reset.model_dump(mode="json")))
    assert body["error"]["code"] == "WORKER_RESET" and body["error"]["type"] == "unavailable_error"
    [body] = relay.feed(frame(2, "end", tokens_out=1, finish_reason="canceled"))
    assert body["error"]["code"] == "CANCELED"
    full = errors.envelope(ErrorCode.ADMISSION_REJECT, "full")
    assert openai_chunks.error_body(full, status=429)["error"]["type"] == "rate_limit_error"


def test_the_whole_answer_comes_from_the_result() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = results.Result(
        task_id="c1",
        status="succeeded",
        text="",
        tool_calls=[call],
        tokens_out=4,
        finish_reason="tool_calls",
        engine_version="sim-0.1.0",
    )
    body = openai_chunks.whole(
        result, kind="chat", id="c1", model="m1", created=1, prompt_estimate=5
    )
    message = body["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"] == [call]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    text = openai_chunks.whole(
        result.model_copy(update={"text": "abc", "finish_reason": "length", "prompt_tokens": 2}),
        kind="text",
        id="c1",
        model="m1",
        created=1,
        prompt_estimate=5,
    )
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "abc"
    assert text["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize(
    "status", [400, 404, 405, 409, 411, 413, 414, 417, 422, 429, 431, 500, 503]
)
def test_an_error_type_follows_its_status_class(status: int) -> None:
    """A client error is never typed a server error (OpenAI's SDKs retry those)."""
    envelope = errors.envelope(errors.ErrorCode.INVALID_PARAMS, "x")
    kind = openai_chunks.error_body(envelope, status=status)["error"]["type"]
    assert (kind == "server_error") == (status >= 500) or kind == "unavailable_error", kind


def test_a_long_list_of_tool_names_is_cut_between_names_and_says_how_many_more() -> None:
    names = [f"t{i:03d}" + "x" * 60 for i in range(128)]
    given = {
        "model": "m1",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": n}} for n in names],
        "tool_choice": {"type": "function", "function": {"name": "zz"}},
    }
    param, message = refusal(given)
    assert param == "tool_choice"
    listed = message.split("(given: ", 1)[1]
    shown = re.findall(r"'([^']*)'", listed)
    assert shown and all(n.startswith("t") and "…" in n and len(n) == 39 for n in shown), listed
    assert listed.endswith(f" and {128 - len(shown)} more)"), listed


def test_an_unknown_model_is_told_only_the_models_it_could_name() -> None:
    """Not the Retired one (409), nor one without a pool (503)."""
    param, message = refusal({"model": "nope", "messages": HI}, "chat")
    assert param == "model" and message.endswith("is not served here; use one of: m1"), message
