"""The OpenAI-compatible routes driven by the official `openai` client against a real daemon
on the sim engine: the model list, chat and completions (streamed and whole), tool calls,
refusals by field, a 429 the client retries, a disconnect that cancels, sessions that keep
their replica, queue-position comments, auth, and the exact bytes `curl -N` receives."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from state import atomic
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
HI = [{"role": "user", "content": "hello there"}]


def _base(running: Any) -> str:
    server = running.daemon.server
    assert server is not None
    return str(server.url)


def client(running: Any, **options: Any) -> openai.AsyncOpenAI:
    options.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(base_url=_base(running) + "/v1", api_key="any-key", **options)


def slow_pool(workspace: Workspace, tokens_per_s: float = 20, **queue: Any) -> None:
    cfg = config(queue=queue) if queue else config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": tokens_per_s, "load_s": 0.0})
    workspace.write_config(cfg)


async def test_the_model_list_shows_the_models_of_orch_yaml_and_their_pools(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    async with client(running) as oa:
        models = {m.id: m for m in (await oa.models.list()).data}
        one = await oa.models.retrieve("m1")
        by_pool = await oa.models.retrieve("p1")  # a pool id names its model, as in requests
    assert by_pool.id == "m1"
    assert set(models) == {"m1", "old"}
    extra = models["m1"].model_extra or {}
    assert extra["ready"] is True and extra["state"] == "Active"
    assert extra["pools"] == [
        {"pool_id": "p1", "state": "Ready", "reason": None, "replicas_ready": 1}
    ]
    assert (models["old"].model_extra or {})["state"] == "Retired"
    assert one.id == "m1" and models["m1"].owned_by == "llama-orch"


async def test_a_models_created_time_stays_put_when_another_part_of_orch_yaml_changes(
    workspace: Workspace, serve: Any
) -> None:
    """OpenAI clients read `created` as when the model came to be: an edit of anything else
    (a session limit) must not move it; a model added later gets its own."""
    running = await serve()
    async with client(running) as oa:
        before = {m.id: m.created for m in (await oa.models.list()).data}
        await asyncio.sleep(1.1)  # `created` counts whole seconds
        edited = config(sessions={"ttl_s": 600, "max_turns": 20})
        edited["models"]["m2"] = {"ref": "file:m2.gguf", "size_mib": 1000}
        revision = workspace.status()["config"]["revision"]
        workspace.write_config(edited)
        await wait_for(lambda: workspace.status()["config"]["revision"] != revision, 10)
        after = {m.id: m.created for m in (await oa.models.list()).data}
    assert after["m1"] == before["m1"] and after["old"] == before["old"], (before, after)
    assert after["m2"] > before["m1"]


async def test_a_chat_completion_is_a_task_with_its_result_and_headers(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    async with client(running) as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model="m1", messages=HI, max_tokens=6, seed=5
        )
        answer = raw.parse()
        again = await oa.chat.completions.create(model="m1", messages=HI, max_tokens=6, seed=5)
    task_id = raw.headers["X-Task-Id"]
    assert answer.id == task_id and task_id.startswith("chatcmpl-")
    assert raw.headers["X-Queue-Position"] == "0" and "X-Predicted-Start-Ms" in raw.headers
    [choice] = answer.choices
    assert choice.message.role == "assistant" and len(choice.message.content.split()) == 6
    assert (
        choice.finish_reason == "length"
        and again.choices[0].message.content == choice.message.content
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 6
    result = workspace.result(task_id)
    assert result is not None and result["status"] == "succeeded"
    assert (
        result["text"] == choice.message.content
        and result["labels"]["api"] == "openai.chat.completions"
    )
    assert [f.event for f in workspace.frames(task_id)][-1] == "end"


async def test_a_streamed_chat_gives_the_same_text_then_usage_and_done(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    async with client(running) as oa:
        whole = await oa.chat.completions.create(model="m1", messages=HI, max_tokens=8, seed=9)
        stream = await oa.chat.completions.create(
            model="m1",
            messages=HI,
            max_tokens=8,
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert {c.id for c in chunks} == {chunks[0].id}
    assert workspace.result(chunks[0].id)["status"] == "succeeded"  # type: ignore[index]


async def test_completions_stream_and_answer_whole(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    async with client(running) as oa:
        whole = await oa.completions.create(model="m1", prompt="once upon", max_tokens=5, seed=1)
        stream = await oa.completions.create(
            model="m1", prompt="once upon", max_tokens=5, seed=1, stream=True
        )
        pieces = [c.choices[0].text async for c in stream if c.choices]
        stopped = await oa.completions.create(
            model="m1",
            prompt="once upon",
            max_tokens=5,
            seed=1,
            stop=[whole.choices[0].text.split()[2]],
        )
    assert whole.object == "text_completion" and len(whole.choices[0].text.split()) == 5
    assert "".join(pieces) == whole.choices[0].text
    assert stopped.choices[0].finish_reason == "stop"
    assert len(stopped.choices[0].text.split()) == 2
    result = workspace.result(whole.id)
    assert result is not None and result["labels"]["api"] == "openai.completions"


async def test_tool_calls_pass_through_streamed_and_whole(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    ask = [{"role": "user", "content": "please call get_weather for Oslo"}]
    async with client(running) as oa:
        whole = await oa.chat.completions.create(
            model="m1", messages=ask, tools=[WEATHER], max_tokens=64, seed=3
        )
        stream = await oa.chat.completions.create(
            model="m1", messages=ask, tools=[WEATHER], max_tokens=64, seed=3, stream=True
        )
        chunks = [c async for c in stream]
        [call] = whole.choices[0].message.tool_calls or []
        follow = [
            *ask,
            whole.choices[0].message,  # as the SDKs' loops send it back: refusal: null and all
            {"role": "tool", "tool_call_id": call.id, "content": "rain"},
        ]
        after = await oa.chat.completions.create(
            model="m1", messages=follow, tools=[WEATHER], max_tokens=4, seed=3
        )
        # and a plain answer appended as it came, with every null field the SDK keeps
        again = await oa.chat.completions.create(
            model="m1",
            messages=[
                *HI,
                after.choices[0].message.model_dump(),
                {"role": "user", "content": "and again"},
            ],
            max_tokens=4,
        )
        assert again.choices[0].message.content
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content is None
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city", "days"}
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id == call.id and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert after.choices[0].finish_reason == "length" and after.choices[0].message.content
    result = workspace.result(whole.id)
    assert result is not None and result["tool_calls"] == [call.model_dump(exclude_none=True)]
    token = next(f for f in workspace.frames(whole.id) if f.event == "token")
    assert token.data["tool_calls"][0]["function"]["name"] == "get_weather"
    assert workspace.frames(whole.id)[-1].data["finish_reason"] == "tool_calls"


async def test_a_tool_call_cut_by_max_tokens_can_be_sent_back_as_it_came(
    workspace: Workspace, serve: Any
) -> None:
    """An agent appends the assistant's message as received, then the tool's answer: a call
    max_tokens cut in its arguments (text that is not JSON) must not make every later turn
    of the conversation a 400, nor the engine's template fail on it."""
    running = await serve()
    ask = [{"role": "user", "content": "please call get_weather for Oslo"}]
    async with client(running) as oa:
        cut = await oa.chat.completions.create(
            model="m1", messages=ask, tools=[WEATHER], tool_choice="required", max_tokens=2
        )
        [call] = cut.choices[0].message.tool_calls or []
        follow = [
            *ask,
            cut.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "error: arguments cut short"},
        ]
        after = await oa.chat.completions.create(
            model="m1", messages=follow, tools=[WEATHER], max_tokens=4
        )
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)
    assert after.choices[0].finish_reason == "length" and after.choices[0].message.content
    result = workspace.result(after.id)
    assert result is not None and result["status"] == "succeeded"


async def test_a_503_says_to_retry_only_when_waiting_can_help(
    workspace: Workspace, serve: Any
) -> None:
    """The SDKs retry a 503 that says `x-should-retry: true` for about 10 s, each try a new
    refused task: a model no pool serves cannot succeed by retrying; one whose pool does not
    fit the GPUs now may, once memory is freed elsewhere."""
    cfg = config()
    cfg["models"]["spare"] = {"ref": "file:spare.gguf", "size_mib": 1000}
    cfg["models"]["huge"] = {"ref": "file:huge.gguf", "size_mib": 40000}
    cfg["pools"].append({"id": "huge", "engine": "sim", "model": "huge"})
    workspace.write_config(cfg)
    running = await serve(ready=False)
    await wait_for(
        lambda: any(p["state"] == "Unschedulable" for p in workspace.status()["pools"]), 10
    )
    url = _base(running) + "/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        seen = {}
        for model in ("spare", "huge"):
            body = {"model": model, "messages": HI, "max_tokens": 2}
            async with session.post(url, json=body) as response:
                seen[model] = (response.status, dict(response.headers), await response.json())
    status, headers, body = seen["spare"]
    assert status == 503 and body["error"]["code"] == "POOL_UNAVAILABLE"
    assert headers["x-should-retry"] == "false" and "Retry-After" not in headers
    assert body["error"]["retriable"] is False
    status, headers, body = seen["huge"]
    assert status == 503 and body["error"]["code"] == "POOL_UNAVAILABLE"
    assert headers["x-should-retry"] == "true" and headers["Retry-After"] == "5"
    assert body["error"]["retriable"] is True


async def test_a_refusal_is_answered_once_its_result_file_is_on_disk(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As POST /v1/tasks answers: a client (or script) that reads results/<X-Task-Id>.json
    after a refusal finds the rejected result there, however slow the disk's commit."""
    running = await serve()
    commit = atomic.commit

    def slow_commit(*args: Any, **kwargs: Any) -> None:
        time.sleep(0.3)  # a slow disk: the group lands well after the refusal is known
        commit(*args, **kwargs)

    monkeypatch.setattr(atomic, "commit", slow_commit)
    body = {"model": "m1", "messages": HI, "max_tokens": 999_999}
    async with (
        aiohttp.ClientSession() as session,
        session.post(_base(running) + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status == 400
        task_id = response.headers["X-Task-Id"]
        result = workspace.result(task_id)
    assert result is not None and result["status"] == "rejected", result


async def test_what_cannot_be_honoured_is_refused_naming_the_field(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    cases: list[tuple[dict[str, Any], type[openai.APIStatusError], str | None]] = [
        ({"n": 2}, openai.BadRequestError, "n"),
        ({"logprobs": True}, openai.BadRequestError, "logprobs"),
        ({"extra_body": {"mirostat": 2}}, openai.BadRequestError, "mirostat"),
        ({"messages": image}, openai.BadRequestError, "messages[0].content[0].type"),
        ({"temperature": 9}, openai.BadRequestError, "temperature"),
        ({"seed": -1}, openai.BadRequestError, "seed"),
        ({"model": "gpt-4o"}, openai.NotFoundError, "model"),
        ({"model": "old"}, openai.ConflictError, "model"),
        ({"tool_choice": "required"}, openai.BadRequestError, "tool_choice"),
        # refused by admission, past the request's own checks: more than the context holds
        (
            {"messages": [{"role": "user", "content": "word " * 3000}]},  # alone over ctx
            openai.BadRequestError,
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": "word " * 1000}], "max_tokens": 1500},
            openai.BadRequestError,
            "max_tokens",  # the two together over ctx: what it may generate is cut first
        ),
        # and by the task file's own bounds
        (
            {"messages": [{"role": "user", "content": "w" * 600_000}]},
            openai.BadRequestError,
            "messages",
        ),
    ]
    async with client(running) as oa:
        for extra, error, param in cases:
            kwargs: dict[str, Any] = {"model": "m1", "messages": HI, "max_tokens": 4} | extra
            with pytest.raises(error) as refused:
                await oa.chat.completions.create(**kwargs)
            body = refused.value.body
            assert isinstance(body, dict) and body["param"] == param, body
            assert body["message"] and body["type"] and body["code"], body
            assert refused.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.BadRequestError) as refused:
            await oa.completions.create(model="m1", prompt="x", suffix="y")
        assert refused.value.body["param"] == "suffix"  # type: ignore[index]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{_base(running)}/v1/chat/completions",
            data=b'{"model": "m1",',
            headers={"Content-Type": "application/json"},
        ) as response,
    ):
        body = await response.json()
    assert response.status == 400 and body["error"]["code"] == "INVALID_PARAMS"
    assert "is not valid JSON" in body["error"]["message"] and body["error"]["param"] is None
    async with aiohttp.ClientSession() as session:  # a wrong method: still OpenAI's shape
        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/models")):
            async with session.request(method, f"{_base(running)}{path}") as response:
                body = await response.json()
            assert response.status == 405 and "Allow" in response.headers, (path, body)
            assert body["error"]["code"] == "METHOD_NOT_ALLOWED", (path, body)


async def test_a_full_queue_is_a_429_with_retry_after_that_the_client_honours(
    workspace: Workspace, serve: Any
) -> None:
    slow_pool(workspace, tokens_per_s=40, capacity=1, full_policy="reject")
    running = await serve()
    async with client(running) as oa, client(running, max_retries=20) as patient:
        dispatcher = running.daemon.dispatcher
        busy = []
        for ready in (lambda: dispatcher.running, lambda: len(dispatcher.queue) == 1):
            busy.append(
                asyncio.create_task(
                    oa.chat.completions.create(model="m1", messages=HI, max_tokens=20)
                )
            )
            await wait_for(ready, 10, "one task running, then one queued")
        with pytest.raises(openai.RateLimitError) as refused:
            await oa.chat.completions.create(model="m1", messages=HI, max_tokens=2)
        headers = refused.value.response.headers
        assert int(headers["Retry-After"]) >= 1 and int(headers["Retry-After-Ms"]) >= 250
        assert headers["x-should-retry"] == "true"
        assert refused.value.body["code"] == "ADMISSION_REJECT"  # type: ignore[index]
        assert refused.value.body["type"] == "rate_limit_error"  # type: ignore[index]
        late = await patient.chat.completions.create(model="m1", messages=HI, max_tokens=2)
        await asyncio.gather(*busy)
    assert late.choices[0].finish_reason == "length"
    statuses = [
        json.loads(path.read_text())["status"]
        for path in (workspace.root / "results").glob("chatcmpl-*.json")
        if not path.name.endswith(".events.jsonl")
    ]
    assert statuses.count("rejected") >= 2  # the refusal above, and one the client retried


async def test_a_client_that_goes_away_cancels_its_task(workspace: Workspace, serve: Any) -> None:
    slow_pool(workspace, tokens_per_s=20)
    running = await serve()
    async with client(running) as oa:
        stream = await oa.chat.completions.create(
            model="m1", messages=HI, max_tokens=200, stream=True
        )
        task_id = ""
        async for chunk in stream:
            task_id = chunk.id
            if chunk.choices and chunk.choices[0].delta.content:
                break  # tokens are flowing: now hang up
        await stream.close()
        result = await wait_terminal(workspace, task_id)
        assert result["status"] == "canceled" and 0 < result["tokens_out"] < 200
        with pytest.raises(openai.APITimeoutError):
            await oa.chat.completions.create(
                model="m1",
                messages=HI,
                max_tokens=200,
                timeout=0.5,
                extra_headers={"X-Correlation-Id": "gone-1"},
            )
    statuses = await wait_for(
        lambda: [
            r["status"]
            for r in (
                workspace.result(p.stem)
                for p in (workspace.root / "results").glob("chatcmpl-*.json")
            )
            if r and r["task_id"] != task_id and r["status"] in ("canceled", "succeeded")
        ],
        10,
        "the whole-answer request's task to end",
    )
    assert statuses == ["canceled"]


def two_pools(workspace: Workspace) -> None:
    cfg = config()
    second = json.loads(json.dumps(cfg["pools"][0])) | {"id": "p2"}
    cfg["pools"].append(second)
    workspace.write_config(cfg)


async def test_a_session_keeps_its_conversation_on_one_replica(
    workspace: Workspace, serve: Any
) -> None:
    two_pools(workspace)
    running = await serve()
    replicas: dict[str, set[str]] = {"by-header": set(), "by-user": set()}
    async with client(running) as oa:
        for turn in range(4):
            for how in replicas:
                options: dict[str, Any] = (
                    {"extra_headers": {"X-Session-Id": "conv-7"}}
                    if how == "by-header"
                    else {"user": "someone@example.com"}
                )
                answer = await oa.chat.completions.create(
                    model="m1",
                    messages=[*HI, {"role": "user", "content": f"turn {turn}"}],
                    max_tokens=3,
                    **options,
                )
                result = workspace.result(answer.id)
                assert result is not None
                replicas[how].add(result["replica_id"])
                assert result["session_id"] in ("conv-7",) or result["session_id"].startswith(
                    "user-"
                )
    assert all(len(seen) == 1 for seen in replicas.values()), replicas
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{_base(running)}/v1/sessions/conv-7") as response,
    ):
        info = await response.json()
    assert info["turns"] == 4 and info["last_replica_id"] in replicas["by-header"]


async def test_a_waiting_stream_hears_its_queue_position_until_it_starts(
    workspace: Workspace, serve: Any
) -> None:
    slow_pool(workspace, tokens_per_s=20)
    running = await serve()
    dispatcher = running.daemon.dispatcher
    body = {"model": "m1", "messages": HI, "max_tokens": 30, "stream": True}
    async with aiohttp.ClientSession() as session:
        ahead = []
        for ready in (lambda: dispatcher.running, lambda: len(dispatcher.queue) == 1):
            ahead.append(
                asyncio.create_task(
                    session.post(f"{_base(running)}/v1/chat/completions", json=body)
                )
            )
            await wait_for(ready, 10, "one task running, then one queued")
        async with session.post(
            f"{_base(running)}/v1/chat/completions", json=body | {"max_tokens": 2}
        ) as response:
            assert response.headers["X-Queue-Position"] == "1"
            assert int(response.headers["X-Predicted-Start-Ms"]) > 0
            raw = (await response.read()).decode()
        for job in ahead:
            (await job).close()
    lines = [line for line in raw.split("\n") if line]
    comments = [line for line in lines if line.startswith(":")]
    assert comments[0] == ": queue position 1" and ": queue position 0" in comments
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert all(line.startswith(":") for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"


async def test_the_api_token_rules_apply_to_the_openai_routes(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "feedfacefeedface1234"
    monkeypatch.setenv("TEST_ORCH_TOKEN", token)
    workspace.write_config(
        config(auth={"token_env": "TEST_ORCH_TOKEN", "optional_on_loopback": False})
    )
    running = await serve()
    base = _base(running) + "/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key="wrong-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as refused:
            await bad.models.list()
    assert refused.value.body["code"] == "BAD_TOKEN"  # type: ignore[index]
    async with openai.AsyncOpenAI(base_url=base, api_key=token, max_retries=0) as good:
        answer = await good.chat.completions.create(model="m1", messages=HI, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"


CURL = shutil.which("curl")
# What `curl -N` prints for a streamed chat of 3 tokens, seed 42, on the sim engine (the id
# and the creation time replaced): a queue-position comment, the role chunk, one chunk per
# token, the finish chunk, [DONE].
TRANSCRIPT = """\
: queue position 0

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m1","system_fingerprint":"sim-0.1.0","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m1","system_fingerprint":"sim-0.1.0","choices":[{"index":0,"delta":{"content":" stone"},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m1","system_fingerprint":"sim-0.1.0","choices":[{"index":0,"delta":{"content":" or"},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m1","system_fingerprint":"sim-0.1.0","choices":[{"index":0,"delta":{"content":" violet"},"logprobs":null,"finish_reason":null}]}

data: {"id":"ID","object":"chat.completion.chunk","created":0,"model":"m1","system_fingerprint":"sim-0.1.0","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}]}

data: [DONE]

"""


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_curl_receives_these_exact_bytes(
    workspace: Workspace, serve: Any, tmp_path: Path
) -> None:
    running = await serve()
    body = {"model": "m1", "messages": HI, "max_tokens": 3, "seed": 42, "stream": True}
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        *(CURL, "-sN", "-D", str(tmp_path / "headers"), "-H", "Content-Type: application/json"),
        *("-d", json.dumps(body), f"{_base(running)}/v1/chat/completions"),
        stdout=subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    head = (tmp_path / "headers").read_bytes().decode()
    task_id = head.split("X-Task-Id: ")[1].split("\r\n")[0]
    created = json.loads(text.split("data: ")[1].split("\n")[0])["created"]
    assert text.replace(task_id, "ID").replace(f'"created":{created}', '"created":0') == TRANSCRIPT
    lines = head.replace(task_id, "ID").split("\r\n")
    assert lines[:9] == [
        "HTTP/1.1 200 OK",
        "X-Task-Id: ID",
        lines[2],  # X-Correlation-Id: a new UUID
        "X-Queue-Position: 0",
        lines[4],  # X-Predicted-Start-Ms: 0 on an idle replica
        "Content-Type: text/event-stream",
        "Cache-Control: no-cache",
        "X-Accel-Buffering: no",
        "Transfer-Encoding: chunked",
    ]
    assert lines[2].startswith("X-Correlation-Id: ")
    assert lines[4].startswith("X-Predicted-Start-Ms: ")


async def test_unknown_paths_name_themselves_and_openai_ones_answer_in_openai_shape(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _base(running)
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/chat/completions/", "/v1/embeddings", "/v1/responses"):
            async with session.post(f"{base}{path}", json={"model": "m1"}) as response:
                body = await response.json()
                assert response.status == 404, path
                assert body["error"]["message"] == f"no such path: POST {path}", body
                assert body["error"]["type"] == "not_found_error"
        async with session.get(f"{base}/v1/nothing-here") as response:
            body = await response.json()
            assert response.status == 404 and body["code"] == "NOT_FOUND"
            assert body["message"] == "no such path: GET /v1/nothing-here"
            assert "openapi.yaml" in body["hint"]
    async with client(running) as oa:
        with pytest.raises(openai.NotFoundError) as missing:
            await oa.embeddings.create(model="m1", input="x")
        assert "no such path: POST /v1/embeddings" in str(missing.value)


async def test_a_budgeted_session_without_max_tokens_gets_what_its_budget_has_left(
    workspace: Workspace, serve: Any
) -> None:
    """Agents often send no max_tokens: in a session with a token budget the default is what
    the budget has left, not the context's room (which the budget would refuse)."""
    workspace.write_config(config(sessions={"ttl_s": 600, "max_turns": 8, "token_budget": 10}))
    running = await serve()
    async with client(running) as oa:
        messages: Any = [{"role": "user", "content": "hi"}]
        first = await oa.chat.completions.create(
            model="m1", messages=messages, extra_headers={"X-Session-Id": "budgeted"}
        )
        assert first.usage is not None and first.usage.completion_tokens == 10
        assert first.choices[0].finish_reason == "length"
        with pytest.raises(openai.APIStatusError) as refused:
            await oa.chat.completions.create(
                model="m1", messages=messages, extra_headers={"X-Session-Id": "budgeted"}
            )
    assert refused.value.status_code == 409
    assert "budget" in refused.value.message


async def test_a_session_from_the_user_field_starts_over_at_its_limits(
    workspace: Workspace, serve: Any
) -> None:
    """OpenAI's `user` is an end-user tag a client sets once for all its requests: the
    session made from it starts over at its turn limit instead of locking the user out;
    a session the client names (X-Session-Id) is still refused past its limit."""
    workspace.write_config(config(sessions={"ttl_s": 600, "max_turns": 2}))
    running = await serve()
    messages: Any = [{"role": "user", "content": "hi"}]
    async with client(running) as oa:
        for _ in range(5):
            answer = await oa.chat.completions.create(
                model="m1", messages=messages, max_tokens=2, user="carol"
            )
            assert answer.choices[0].message.content
        for _ in range(2):
            await oa.chat.completions.create(
                model="m1", messages=messages, max_tokens=2, extra_headers={"X-Session-Id": "s"}
            )
        with pytest.raises(openai.APIStatusError) as refused:
            await oa.chat.completions.create(
                model="m1", messages=messages, max_tokens=2, extra_headers={"X-Session-Id": "s"}
            )
    assert refused.value.status_code == 409
    assert "SESSION_TURNS_EXCEEDED" in str(refused.value.body)


async def test_without_max_tokens_the_context_end_is_the_limit_not_a_failure(
    workspace: Workspace, serve: Any
) -> None:
    """The server picks max_tokens from an estimate of the prompt, which can be short of
    the engine's count: the context then fills first. The client asked for no limit, so
    that is finish_reason length with the text, as OpenAI answers, not a 400."""
    cfg = config()
    cfg["pools"][0].update(ctx=64, sim={"tokens_per_s": 2000, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    async with client(running) as oa:
        text = await oa.completions.create(model="m1", prompt="hi")
        chat = await oa.chat.completions.create(model="m1", messages=HI)
        limited = await oa.completions.create(model="m1", prompt="hi", max_tokens=5)
    assert text.choices[0].finish_reason == "length" and text.choices[0].text, text
    assert chat.choices[0].finish_reason == "length" and chat.choices[0].message.content
    assert (workspace.result(text.id) or {})["status"] == "succeeded"
    assert limited.choices[0].finish_reason == "length" and limited.usage.completion_tokens == 5


async def test_without_max_tokens_the_answer_runs_to_the_real_end_of_the_context(
    workspace: Workspace, serve: Any
) -> None:
    """The prompt's estimate (bytes / 4) is 750 tokens high for 3,000 five-byte words; the
    answer must still run until the engine's context is full, not stop 750 tokens short."""
    cfg = config()
    cfg["pools"][0].update(ctx=4096, sim={"tokens_per_s": 20000, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    async with client(running) as oa:
        answer = await oa.completions.create(model="m1", prompt="word " * 3000)
    usage = answer.usage
    assert answer.choices[0].finish_reason == "length"
    assert usage is not None and usage.prompt_tokens + usage.completion_tokens >= 4096 - 8, usage


async def test_openai_tasks_a_crashed_daemon_left_are_canceled_not_run_for_nobody(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon killed with OpenAI requests in flight leaves their task files (queued,
    running, or still in incoming/): their clients' connections ended with it, so the next
    daemon cancels them instead of spending the GPU on answers nobody can receive; a task of
    POST /v1/tasks or a task file is recovered and runs as ever."""
    from state import events, results, spool

    the_spool = workspace.spool
    bound = {"api": "openai.chat.completions"}
    store = workspace.results

    def left(task_id: str, where: Path, labels: dict[str, str], queued: bool) -> None:
        body = {
            "task_id": task_id,
            "model": "m1",
            "prompt": "hi",
            "max_tokens": 4,
            "labels": labels,
        }
        (where / f"{task_id}.task.json").write_text(json.dumps(body))
        if queued:  # the crashed daemon had written its queued frame and result
            events.EventLog(store.events_path(task_id)).append(
                "queued", {}, ts="2026-01-01T00:00:00Z"
            )
            store.write(
                results.Result(
                    task_id=task_id,
                    status="queued",
                    source_file=f"spool/active/{task_id}.task.json",
                )
            )

    left("chatcmpl-a", the_spool.incoming, bound, queued=False)
    left("chatcmpl-b", the_spool.active, bound, queued=False)
    left("chatcmpl-c", the_spool.active, bound, queued=True)
    left("plain", the_spool.active, {"team": "x"}, queued=True)
    # one killed while it streamed: its log has its first tokens, its result says running
    left("chatcmpl-d", the_spool.active, bound, queued=True)
    log = events.EventLog(store.events_path("chatcmpl-d"), new=False)
    log.append("started", {"attempt": 1}, ts="2026-01-01T00:00:01Z")
    log.extend("token", [{"t": "Hel", "i": 0}, {"t": "lo", "i": 1}], ts="2026-01-01T00:00:02Z")
    log.close()
    store.write(
        results.Result(
            task_id="chatcmpl-d", status="running", source_file="spool/active/chatcmpl-d.task.json"
        )
    )
    await asyncio.sleep(0.1)  # delivered before the new daemon began
    caplog.set_level("INFO", logger="llama_orch")
    await serve()
    for task_id in ("chatcmpl-a", "chatcmpl-b", "chatcmpl-c"):
        ended = await wait_terminal(workspace, task_id)
        assert ended["status"] == "canceled" and ended["tokens_out"] == 0, ended
        assert not any(f.event == "started" for f in workspace.frames(task_id))
    # canceled too, saying what its cut-short attempt had made (its client got those)
    streamed = await wait_terminal(workspace, "chatcmpl-d")
    assert streamed["status"] == "canceled", streamed
    assert (streamed["tokens_out"], streamed["text"]) == (2, "Hello"), streamed
    plain = await wait_terminal(workspace, "plain")
    assert plain["status"] == "succeeded" and plain["tokens_out"] == 4
    orphaned = [r for r in caplog.records if getattr(r, "orch_event", "") == "task.orphaned"]
    assert len(orphaned) == 4 and "nobody can receive it" in orphaned[0].getMessage()
    assert spool.cancel_requests(the_spool) == []


async def test_the_labels_the_openai_routes_set_are_refused_on_post_v1_tasks(
    workspace: Workspace, serve: Any
) -> None:
    """`session_from` would switch off the session limits of orch.yaml, `api` would make a
    task one a restart cancels: a client of POST /v1/tasks may set neither."""
    running = await serve()
    async with aiohttp.ClientSession() as session:
        for label in ("session_from", "api"):
            body = {
                "model": "m1",
                "prompt": "hi",
                "max_tokens": 2,
                "labels": {label: "openai.user"},
            }
            async with session.post(f"{_base(running)}/v1/tasks", json=body) as response:
                answer = await response.json()
            assert response.status == 400 and answer["code"] == "INVALID_PARAMS", answer
            assert answer["message"].startswith(f"labels.{label}: reserved"), answer
            assert answer["hint"]
        body = {"model": "m1", "prompt": "hi", "max_tokens": 2, "labels": {"team": "x"}}
        async with session.post(f"{_base(running)}/v1/tasks", json=body) as response:
            assert response.status == 202, await response.text()


async def test_a_request_without_max_tokens_runs_within_its_pools_limit(
    workspace: Workspace, serve: Any
) -> None:
    """No max_tokens: up to the most room a pool gives (pa: no limit). Placed on pb (pa is
    busy), whose max_tokens is 6, it writes at most 6 tokens: a pool's limit is never
    exceeded, whatever the ceiling was."""
    cfg = config()
    pa = cfg["pools"][0] | {"id": "pa", "slots": 1, "ctx": 512}
    pa["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    cfg["pools"] = [
        pa,
        pa | {"id": "pb", "max_tokens": 6, "sim": {"tokens_per_s": 400, "load_s": 0.0}},
    ]
    workspace.write_config(cfg)
    running = await serve()
    workspace.submit("busy.task.yaml", task("busy", max_tokens=60, pool="pa"))
    await wait_for(lambda: (workspace.result("busy") or {}).get("status") == "running", 10)
    async with client(running) as oa:
        answer = await oa.completions.create(model="m1", prompt="hello there")
    assert answer.usage is not None and answer.usage.completion_tokens <= 6, answer.usage
    assert answer.choices[0].finish_reason == "length"
