"""The sim engine's chat endpoint through the llama-server client, as the daemon uses it: a
deterministic answer per seed and conversation, tool calls when the user asks for a tool,
JSON answers for response_format, stop strings, and llama-server's chunk shapes on the wire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from plugins import interfaces, sim_chat
from state import chats
from tests.test_sim_engine import Replicas

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city"],
        },
    },
}


def chat(
    *messages: dict[str, Any], seed: int = 7, max_tokens: int = 10, **options: Any
) -> interfaces.GenerateRequest:
    return interfaces.GenerateRequest(
        task_id="c",
        prompt="",
        max_tokens=max_tokens,
        seed=seed,
        stop=tuple(options.pop("stop", ())),
        chat={"messages": list(messages), **options},
    )


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.fixture
async def sims(tmp_path: Path) -> AsyncIterator[Replicas]:
    replicas = Replicas(tmp_path)
    try:
        yield replicas
    finally:
        await replicas.stop_all()


async def items(sims: Replicas, handle: Any, req: interfaces.GenerateRequest) -> list[Any]:
    return [item async for item in sims.engine.generate(handle, req)]


async def test_a_chat_answer_is_deterministic_for_a_seed_and_conversation(sims: Replicas) -> None:
    handle = await sims.ready()
    text, done = await sims.text(handle, chat(user("hello"), seed=3))
    again, _ = await sims.text(handle, chat(user("hello"), seed=3))
    other_seed, _ = await sims.text(handle, chat(user("hello"), seed=4))
    other_turn, _ = await sims.text(handle, chat(user("hello"), user("and?"), seed=3))
    assert text == again and len(text.split()) == 10
    assert other_seed != text and other_turn != text
    assert (done.tokens_out, done.finish_reason) == (10, "length")
    rendered = sim_chat.render([user("hello")])
    assert rendered == "<|user|>\nhello\n<|assistant|>\n"
    assert done.prompt_tokens == len(rendered.split()) + 1


async def test_a_user_naming_a_tool_gets_a_streamed_tool_call(sims: Replicas) -> None:
    handle = await sims.ready()
    req = chat(user("please call get_weather for Paris"), tools=[WEATHER], max_tokens=50)
    got = await items(sims, handle, req)
    done = got.pop()
    assert isinstance(done, interfaces.Done) and done.finish_reason == "tool_calls"
    head = got[0].tool_calls[0]
    assert head["id"].startswith("call_") and head["function"]["name"] == "get_weather"
    assert all(t.text == "" and len(t.tool_calls) == 1 for t in got)
    calls: list[dict[str, Any]] = []
    chats.merge_tool_calls(calls, [d for t in got for d in t.tool_calls])
    [call] = calls
    arguments = json.loads(call["function"]["arguments"])
    assert set(arguments) == {"city", "days", "unit"} and arguments["unit"] in ("C", "F")
    assert done.tokens_out == len(got)
    again = await items(sims, handle, req)
    assert [t.tool_calls for t in again[:-1]] == [t.tool_calls for t in got]


async def test_tool_choice_decides_whether_the_sim_calls_a_tool(sims: Replicas) -> None:
    handle = await sims.ready()
    plain = user("what is the weather like?")

    async def finish(*messages: dict[str, Any], **options: Any) -> str:
        _, done = await sims.text(handle, chat(*messages, tools=[WEATHER], **options))
        return done.finish_reason

    assert await finish(plain) == "length"  # auto, and the tool is not named
    assert await finish(plain, tool_choice="required", max_tokens=40) == "tool_calls"
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert await finish(plain, tool_choice=named, max_tokens=40) == "tool_calls"
    asked = user("call get_weather")
    assert await finish(asked, tool_choice="none") == "length"
    answered = [
        asked,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert await finish(*answered) == "length"  # after the tool's result: an answer in words


async def test_response_format_gives_a_json_object_and_stop_cuts_text(sims: Replicas) -> None:
    handle = await sims.ready()
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}}
    text, done = await sims.text(handle, chat(user("json!"), response_format=fmt, max_tokens=99))
    assert set(json.loads(text)) == {"name", "n"} and done.finish_reason == "stop"
    text, _ = await sims.text(handle, chat(user("x"), response_format={"type": "json_object"}))
    assert isinstance(json.loads(text), dict)
    whole, _ = await sims.text(handle, chat(user("hi"), max_tokens=10))
    stop = whole.split()[3]
    cut, done = await sims.text(handle, chat(user("hi"), max_tokens=10, stop=[stop]))
    assert cut == whole[: whole.index(stop)] and done.finish_reason == "stop"
    completion = interfaces.GenerateRequest("p", "a prompt", 10, 5)
    plain, _ = await sims.text(handle, completion)
    word = plain.split()[2]
    stopped, done = await sims.text(
        handle, interfaces.GenerateRequest("p", "a prompt", 10, 5, stop=(word,))
    )
    assert stopped == plain[: plain.index(word)] and done.finish_reason == "stop"


async def test_the_wire_shows_llama_servers_chunks_usage_and_done(sims: Replicas) -> None:
    handle = await sims.ready()
    body = {"messages": [user("hi")], "max_tokens": 3, "seed": 1, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{handle.base_url}/v1/chat/completions",
            json=body | {"stream_options": {"include_usage": True}},
        ) as response:
            raw = (await response.read()).decode()
        async with session.post(
            f"{handle.base_url}/chat/completions", json=body | {"stream": False}
        ) as response:
            whole = await response.json()
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["chat.completion.chunk"] * 5
    words = [c["choices"][0]["delta"]["content"] for c in chunks[:3]]
    assert chunks[3]["choices"][0]["finish_reason"] == "length" and "timings" in chunks[3]
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["completion_tokens"] == 3
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "".join(words)}
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 3


def test_a_function_without_parameters_is_called_with_an_empty_object_not_null() -> None:
    body = {
        "messages": [{"role": "user", "content": "call it"}],
        "tools": [{"type": "function", "function": {"name": "ping"}}],
        "tool_choice": "required",
        "seed": 1,
    }
    made = sim_chat.plan(body, ctx=512, vocabulary=("a", "b"), count=lambda text: len(text) // 4)
    text = "".join(
        d["function"].get("arguments", "") for p in made.pieces for d in p.get("tool_calls", [])
    )
    assert json.loads(text) == {}
