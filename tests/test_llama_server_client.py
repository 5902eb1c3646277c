"""The llama-server protocol client against a test server replaying recorded responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from plugins import interfaces, llama_completion, llama_server, processes

FIXTURES = Path("/work/shared/fixtures/llama-server")
if not FIXTURES.is_dir():  # the shared folder beside this checkout
    FIXTURES = Path(__file__).resolve().parents[2] / "shared/fixtures/llama-server"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST = interfaces.GenerateRequest(
    task_id="t1", prompt="hello world", max_tokens=8, seed=42, temperature=0.8, top_p=0.95, top_k=40
)


# llama-server (b1-0c1e570, CPU build, tests/tiny_gguf.py) answering a streamed chat of 3
# tokens with stream_options.include_usage; the model's text is bytes, not words.
CHAT_STREAM = (Path(__file__).parent / "fixtures" / "llama-server-chat-stream.sse").read_bytes()
# How llama-server streams a tool call (as its chat parser emits one), then the finish.
TOOL_STREAM = (
    b"".join(
        b"data: " + json.dumps(frame).encode() + b"\n\n"
        for frame in (
            {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
            {"choices": [{"index": 0, "delta": {"reasoning_content": "Let me check."}}]},
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": "abc",
                                    "type": "function",
                                    "function": {"name": "get_weather", "arguments": ""},
                                }
                            ]
                        },
                    }
                ]
            },
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]
                        },
                    }
                ]
            },
            {
                "choices": [
                    {
                        "index": 0,
                        "delta": {
                            "tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]
                        },
                    }
                ]
            },
            {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                "timings": {"predicted_n": 9, "prompt_n": 20, "cache_n": 5},
            },
        )
    )
    + b"data: [DONE]\n\n"
)
CHAT = interfaces.GenerateRequest(
    task_id="c1",
    prompt="",
    max_tokens=3,
    seed=1,
    stop=("END",),
    chat={"messages": [{"role": "user", "content": "hi"}], "tool_choice": "auto"},
    reuse_cache=True,  # a chat's turns do (reconciler.streaming)
)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(**routes: Handler) -> str:
        app = web.Application()
        for key, handler in routes.items():
            method, _, name = key.partition("_")
            app.router.add_route(method.upper(), "/" + name, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


def replay(name: str, *, status: int = 200, content_type: str = "application/json") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=fixture(name), status=status, content_type=content_type)

    return handler


def streamed(body: bytes, *, then: str = "finish") -> Handler:
    """Send `body` as a chunked event stream, then finish, or drop the connection."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(body)
        if then == "drop":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    return handler


async def collect(stream: AsyncIterator[interfaces.Token | interfaces.Done]) -> list[Any]:
    return [item async for item in stream]


async def test_a_streamed_completion_yields_the_recorded_tokens_then_done(serve: Any) -> None:
    url = await serve(post_completion=streamed(fixture("completion-stream.sse")))
    items = await collect(llama_server.Client(url).generate(REQUEST))
    tokens, done = items[:-1], items[-1]
    assert [t.text for t in tokens] == ["\ufffd;", "|", "g", "\ufffd\x0e\x10"]
    assert [t.index for t in tokens] == [0, 1, 2, 3]
    assert done == interfaces.Done(
        tokens_out=8, finish_reason="length", timings=done.timings, prompt_tokens=13
    )
    assert done.timings["predicted_ms"] == pytest.approx(0.784)
    assert done.timings["prompt_n"] == 13


async def test_the_request_carries_the_tasks_seed_and_sampling_settings(serve: Any) -> None:
    seen: list[dict[str, Any]] = []
    inner = streamed(fixture("completion-stream.sse"))

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return await inner(request)

    url = await serve(post_completion=handler)
    await collect(llama_server.Client(url).generate(REQUEST))
    assert seen == [
        {
            "prompt": "hello world",
            "n_predict": 8,
            "seed": 42,
            "temperature": 0.8,
            "top_p": 0.95,
            "top_k": 40,
            "stream": True,
            "cache_prompt": False,  # a lone prompt: the same text warm or cold
        }
    ]


async def test_a_chat_goes_to_the_chat_endpoint_and_yields_its_chunks_then_done(
    serve: Any,
) -> None:
    seen: list[dict[str, Any]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return await streamed(CHAT_STREAM)(request)

    url = await serve(**{"post_v1/chat/completions": chat})
    items = await collect(llama_server.Client(url).generate(CHAT))
    tokens, done = items[:-1], items[-1]
    assert [t.text for t in tokens] == ["\ufffd", "\ufffd", "x"]
    assert done == interfaces.Done(3, "length", timings=done.timings, prompt_tokens=56)
    assert done.timings["predicted_n"] == 3
    [body] = seen
    assert body["messages"] == [{"role": "user", "content": "hi"}] and body["tool_choice"] == "auto"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["seed"], body["stop"], body["cache_prompt"]) == (
        3,
        1,
        ["END"],
        True,
    )


async def test_a_streamed_tool_call_arrives_as_deltas_and_finishes_with_tool_calls(
    serve: Any,
) -> None:
    url = await serve(**{"post_v1/chat/completions": streamed(TOOL_STREAM)})
    items = await collect(llama_server.Client(url).generate(CHAT))
    tokens, done = items[:-1], items[-1]
    assert tokens[0].reasoning == "Let me check." and tokens[0].text == ""
    assert tokens[1].tool_calls[0]["function"]["name"] == "get_weather"
    assert "".join(t.tool_calls[0]["function"].get("arguments", "") for t in tokens[1:]) == (
        '{"city":"Oslo"}'
    )
    assert done == interfaces.Done(9, "tool_calls", timings=done.timings, prompt_tokens=25)


async def test_a_chat_stream_cut_before_its_finish_raises(serve: Any) -> None:
    cut = CHAT_STREAM[: CHAT_STREAM.index(b'"finish_reason":"length"')]
    cut = cut[: cut.rindex(b"\n\n") + 2]
    url = await serve(**{"post_v1/chat/completions": streamed(cut)})
    with pytest.raises(interfaces.EngineStreamError, match="before the final frame"):
        await collect(llama_server.Client(url).generate(CHAT))


async def test_a_rejected_prompt_raises_a_stream_error_with_the_engines_message(serve: Any) -> None:
    url = await serve(post_completion=replay("error-bad-prompt.json", status=400))
    with pytest.raises(llama_server.RequestRejected) as caught:
        await collect(llama_server.Client(url).generate(REQUEST))
    assert isinstance(caught.value, interfaces.EngineStreamError)
    assert caught.value.status == 400
    assert caught.value.kind == "invalid_request_error"
    assert '"prompt" elements must be a string' in caught.value.message


async def test_an_error_frame_mid_stream_raises_after_the_tokens_before_it(serve: Any) -> None:
    frames = fixture("completion-stream.sse").split(b"\n\n")
    error = b'data: {"error":{"code":500,"message":"slot crashed","type":"server_error"}}'
    url = await serve(post_completion=streamed(b"\n\n".join([*frames[:2], error]) + b"\n\n"))
    got: list[Any] = []
    with pytest.raises(interfaces.EngineStreamError, match="slot crashed"):
        async for item in llama_server.Client(url).generate(REQUEST):
            got.append(item)
    assert [t.text for t in got] == ["\ufffd;", "|"]


async def test_a_stream_that_ends_before_its_final_frame_raises(serve: Any) -> None:
    frames = fixture("completion-stream.sse").split(b"\n\n")
    url = await serve(post_completion=streamed(b"\n\n".join(frames[:3]) + b"\n\n"))
    with pytest.raises(interfaces.EngineStreamError, match="ended before the final frame"):
        await collect(llama_server.Client(url).generate(REQUEST))


async def test_a_connection_dropped_mid_stream_raises(serve: Any) -> None:
    frames = fixture("completion-stream.sse").split(b"\n\n")
    url = await serve(post_completion=streamed(b"\n\n".join(frames[:2]) + b"\n\n", then="drop"))
    with pytest.raises(interfaces.EngineStreamError):
        await collect(llama_server.Client(url).generate(REQUEST))


async def test_a_malformed_frame_raises(serve: Any) -> None:
    url = await serve(post_completion=streamed(b'data: {"index":0,"content":\n\n'))
    with pytest.raises(interfaces.EngineStreamError, match="bad stream frame"):
        await collect(llama_server.Client(url).generate(REQUEST))


async def test_an_engine_that_is_not_listening_raises_a_stream_error() -> None:
    url = f"http://127.0.0.1:{processes.free_port()}"
    with pytest.raises(interfaces.EngineStreamError):
        await collect(llama_server.Client(url).generate(REQUEST))


async def test_closing_the_stream_closes_the_http_request(serve: Any) -> None:
    disconnected = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b'data: {"content":"x","stop":false}\n\n')
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            disconnected.set()
            raise

    url = await serve(post_completion=endless)
    stream = llama_server.Client(url).generate(REQUEST)
    first = await anext(stream)
    assert first == interfaces.Token("x", 0)
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(disconnected.wait(), 2.0)


async def test_a_non_streamed_completion_returns_the_text_and_counts(serve: Any) -> None:
    url = await serve(post_completion=replay("completion.json"))
    completion = await llama_server.Client(url).complete(REQUEST)
    assert completion.text == json.loads(fixture("completion.json"))["content"]
    assert completion.done.tokens_out == 8
    assert completion.done.finish_reason == "length"


async def test_health_reports_loading_until_the_engine_answers_ok(serve: Any) -> None:
    answers = [
        (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
        (200, json.loads(fixture("health.json"))),
    ]

    async def health(request: web.Request) -> web.StreamResponse:
        status, body = answers.pop(0)
        return web.json_response(body, status=status)

    client = llama_server.Client(await serve(get_health=health))
    assert await client.health() == llama_server.Health(False, 503, "Loading model")
    assert await client.health() == llama_server.Health(True, 200, "ok")


async def test_health_of_a_port_nobody_listens_on_is_not_ok() -> None:
    health = await llama_server.Client(f"http://127.0.0.1:{processes.free_port()}").health()
    assert not health.ok
    assert health.status is None


async def test_props_and_slots_are_read_as_recorded(serve: Any) -> None:
    client = llama_server.Client(
        await serve(get_props=replay("props.json"), get_slots=replay("slots.json"))
    )
    props = await client.props()
    assert (props.build_info, props.total_slots, props.n_ctx) == ("b1-0c1e570", 2, 1024)
    assert await client.slots_busy() == [False, False]


def test_a_final_frame_stopped_by_eos_or_a_stop_word_finishes_with_stop() -> None:
    assert (
        llama_completion.done_from(
            {"stop": True, "stop_type": "eos", "tokens_predicted": 3}
        ).finish_reason
        == "stop"
    )
    assert (
        llama_completion.done_from(
            {"stop": True, "stopped_word": True, "tokens_predicted": 3}
        ).finish_reason
        == "stop"
    )
    assert (
        llama_completion.done_from(
            {"stop": True, "stopped_limit": True, "tokens_predicted": 3}
        ).finish_reason
        == "length"
    )


def test_a_final_frame_that_filled_the_context_says_it_was_truncated() -> None:
    """What llama-server answered when the context filled before n_predict (a real run)."""
    done = llama_completion.done_from(
        {"stop": True, "stop_type": "limit", "tokens_predicted": 20, "truncated": True}
    )
    assert (done.finish_reason, done.tokens_out, done.truncated) == ("length", 20, True)
    assert not llama_completion.done_from({"stop": True, "stop_type": "limit"}).truncated
