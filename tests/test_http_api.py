"""The HTTP face through a real socket: tasks in and out, SSE with resume, cancel, sessions,
capabilities, errors for every kind of bad request, and the six auth scenarios."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from reconciler import api_auth, logs
from state import desired, errors
from tests.conftest import Workspace, config, full_disk_under, task, wait_for, wait_terminal
from tests.orchctl_support import orchctl

pytestmark = pytest.mark.slow


async def _slow_daemon(workspace: Workspace, serve: Any, *, tokens_per_s: int) -> tuple[Any, str]:
    """A daemon whose sim pool streams `tokens_per_s`, serving; and its base URL."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": tokens_per_s, "load_s": 0.0}
    workspace.write_config(cfg)
    running = await serve()
    return running, _url(running)


def _url(running: Any) -> str:
    server = running.daemon.server
    assert server is not None
    return str(server.url)


async def _sse(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE body into {id, event, data, retry} dicts (comments skipped)."""
    frame: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if frame:
                yield frame
                frame = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        frame[key] = json.loads(value) if key == "data" else value


async def _frames(session: aiohttp.ClientSession, url: str, **headers: str) -> list[dict[str, Any]]:
    async with session.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [f async for f in _sse(response)]


async def test_a_posted_task_is_admitted_streamed_and_its_result_served(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/tasks",
            json=task("h1", max_tokens=6),
            headers={"X-Correlation-Id": "corr-123"},
        ) as response:
            assert response.status == 202
            assert response.headers["X-Correlation-Id"] == "corr-123"
            body = await response.json()
        assert body["task_id"] == "h1" and body["status"] == "queued"
        assert isinstance(body["queue_position"], int)
        assert body["events_url"] == "/v1/tasks/h1/events"
        frames = await _frames(session, base + body["events_url"])
        assert frames[0]["event"] == "queued" and frames[-1]["event"] == "end"
        assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
        assert frames[0]["retry"] == "2000" and all("retry" not in f for f in frames[1:])
        logged = [f.data for f in workspace.frames("h1")]
        assert [f["data"] for f in frames] == logged  # the same frames as the event log
        async with session.get(f"{base}/v1/tasks/h1") as response:
            result = await response.json()
        assert result["status"] == "succeeded" and result["tokens_out"] == 6
    log = (workspace.root / "results" / "h1.json").read_text()
    assert json.loads(log)["task_id"] == "h1"


async def test_resume_from_every_event_position_has_no_gap_and_no_duplicate(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    workspace.submit("r1.task.yaml", task("r1", max_tokens=5))
    await wait_terminal(workspace, "r1")
    async with aiohttp.ClientSession() as session:
        whole = await _frames(session, f"{base}/v1/tasks/r1/events")
        for position in range(len(whole)):
            rest = await _frames(
                session, f"{base}/v1/tasks/r1/events", **{"Last-Event-ID": str(position)}
            )
            assert [f["id"] for f in rest] == [f["id"] for f in whole[position:]]
        query = await _frames(session, f"{base}/v1/tasks/r1/events?last_event_id=3")
        assert query[0]["id"] == "4"


async def test_a_stream_joined_while_the_task_runs_sees_every_later_frame_once(
    workspace: Workspace, serve: Any
) -> None:
    _running, base = await _slow_daemon(workspace, serve, tokens_per_s=50)
    workspace.submit("live.task.yaml", task("live", max_tokens=30))
    await wait_for(lambda: len(workspace.frames("live")) >= 5, 10, "some tokens")
    async with aiohttp.ClientSession() as session:
        frames = await _frames(session, f"{base}/v1/tasks/live/events", **{"Last-Event-ID": "2"})
    ids = [int(f["id"]) for f in frames]
    assert ids == list(range(3, 3 + len(ids))) and frames[-1]["event"] == "end"
    assert len(ids) == len(workspace.frames("live")) - 2


async def test_once_the_terminal_frame_arrives_the_result_file_is_final(
    workspace: Workspace, serve: Any
) -> None:
    """A client that reads the stream to its end and then looks at the result (over HTTP or
    on disk) finds the final status: the terminal frame is sent only once that result is
    written, not when the frame itself is logged."""
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        for n in range(6):
            async with session.post(f"{base}/v1/tasks", json=task(f"fin{n}", max_tokens=3)) as r:
                assert r.status == 202
                assert workspace.result(f"fin{n}") is not None  # the queued result is there
            async with session.get(f"{base}/v1/tasks/fin{n}/events") as response:
                async for frame in _sse(response):
                    if frame.get("event") in ("end", "error"):
                        result = workspace.result(f"fin{n}")  # at once, before anything else
                        assert result is not None and result["status"] == "succeeded", result
                        break


async def test_bad_requests_get_the_envelope_with_the_right_status(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        cases: list[tuple[dict[str, Any], int, str, str]] = [
            ({"data": b'{"prompt": "x",\n  "max_tokens": }'}, 400, "INVALID_PARAMS", ":2:"),
            ({"data": b"prompt: x", "headers": {"Content-Type": "text/yaml"}}, 415, "", ""),
            ({"data": io.BytesIO(b'{"prompt": "' + b"x" * 1_100_000 + b'"}')}, 413, "", ""),
            ({"json": task("u1") | {"colour": "red"}}, 400, "INVALID_PARAMS", "colour"),
            ({"json": task("u2", model="nope")}, 404, "MODEL_UNKNOWN", "nope"),
            ({"json": [1, 2]}, 400, "INVALID_PARAMS", "JSON object"),
            ({"json": task("u3", max_tokens="4")}, 400, "INVALID_PARAMS", "max_tokens"),
            ({"json": task("u4", max_tokens=True)}, 400, "INVALID_PARAMS", "max_tokens"),
        ]
        for kwargs, status, code, text in cases:
            headers = kwargs.pop("headers", {"Content-Type": "application/json"})
            async with session.post(f"{base}/v1/tasks", headers=headers, **kwargs) as response:
                body = await response.json()
                assert response.status == status, (status, body)
                assert set(body) >= {"code", "message", "retriable", "hint"}
                assert response.headers["X-Correlation-Id"]
                assert code in body["code"] and text in body["message"], body
        workspace.submit("dup.task.yaml", task("dup"))
        await wait_terminal(workspace, "dup")
        async with session.post(f"{base}/v1/tasks", json=task("dup")) as response:
            assert response.status == 409 and (await response.json())["code"] == "DUPLICATE_TASK_ID"
        async with session.get(f"{base}/v1/tasks/ghost") as response:
            assert response.status == 404 and (await response.json())["code"] == "NOT_FOUND"
        async with session.get(f"{base}/v1/tasks/ghost/events") as response:
            assert response.status == 404
        async with session.delete(f"{base}/v1/tasks") as response:
            assert (
                response.status == 405 and (await response.json())["code"] == "METHOD_NOT_ALLOWED"
            )
        async with session.get(f"{base}/no/such/path") as response:
            assert response.status == 404 and (await response.json())["code"] == "NOT_FOUND"


async def test_a_full_queue_answers_429_with_retry_after_and_backoff(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config(queue={"capacity": 1, "full_policy": "reject"})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        for i in range(2):  # one runs, one waits: the queue is full
            async with session.post(f"{base}/v1/tasks", json=task(f"f{i}", max_tokens=40)) as r:
                assert r.status == 202
        async with session.post(f"{base}/v1/tasks", json=task("f2")) as response:
            body = await response.json()
            assert response.status == 429 and body["code"] == "ADMISSION_REJECT"
            assert int(response.headers["Retry-After"]) >= 1
            assert int(response.headers["X-Backoff-Ms"]) == body["retry_after_ms"]
            assert response.headers["X-Task-Id"] == "f2"
        # the clients turned away are spread over the places as they free, not all sent
        # back at once to the first one
        waits = [body["retry_after_ms"]]
        for i in range(3, 6):
            async with session.post(f"{base}/v1/tasks", json=task(f"f{i}")) as response:
                assert response.status == 429
                waits.append((await response.json())["retry_after_ms"])
        assert waits == sorted(waits) and len(set(waits)) == len(waits), waits
        assert waits[1] - waits[0] > 1000  # a 40-token task at 20 tokens/s: about 2 s apart
        assert workspace.result("f2")["status"] == "rejected"  # type: ignore[index]
        # sent again at once, the queue still full: refused again, and said so at once
        began = time.monotonic()
        async with session.post(f"{base}/v1/tasks", json=task("f2")) as response:
            assert response.status == 429, await response.text()
        assert time.monotonic() - began < 5  # not the 10 s a "delivered" answer waits
        # the retry the 429 asks for may use the same id, once there is room
        await wait_terminal(workspace, "f0")
        async with session.post(f"{base}/v1/tasks", json=task("f2", max_tokens=3)) as response:
            answer = await response.json()
            assert response.status == 202 and answer["status"] == "queued", answer
        # answered as it was queued, behind f1, not once it started
        assert workspace.result("f1")["status"] == "running"  # type: ignore[index]
        assert (await wait_terminal(workspace, "f2"))["status"] == "succeeded"
        frames = await _frames(session, f"{base}/v1/tasks/f2/events")
        assert [f["event"] for f in frames][:2] == ["queued", "started"]  # its own log only
        # its ids go on after the two refusals' (a frame each): a resumed stream never splices
        assert [int(f["id"]) for f in frames] == list(range(3, len(frames) + 3))
        async with session.post(f"{base}/v1/tasks", json=task("f2")) as response:
            assert response.status == 409  # a task that ran keeps its id


async def test_a_full_queues_retry_delay_waits_for_its_queued_tasks_to_start(
    workspace: Workspace, serve: Any
) -> None:
    """The queue holds a task of m1, behind m1's busy slot; a short task of m2 runs on its
    own pool. Its end frees no queue place (no queued task can take its slot): the retry
    delay is when the queued m1 task starts, not when the m2 task ends."""
    cfg = config(queue={"capacity": 1, "full_policy": "reject"})
    cfg["models"]["m2"] = {"ref": "file:m2.gguf", "size_mib": 1000}
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    cfg["pools"].append(
        {"id": "p2", "engine": "sim", "model": "m2", "ctx": 2048, "slots": 1,
         "sim": {"tokens_per_s": 100, "load_s": 0.0}}
    )  # fmt: skip
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        for body in (task("long", max_tokens=60), task("short", model="m2", max_tokens=40)):
            async with session.post(f"{base}/v1/tasks", json=body) as r:
                assert r.status == 202
        await wait_for(lambda: (workspace.result("short") or {}).get("status") == "running", 10)
        async with session.post(f"{base}/v1/tasks", json=task("waits", max_tokens=2)) as r:
            assert r.status == 202  # the queue's one place
        async with session.post(f"{base}/v1/tasks", json=task("refused", max_tokens=2)) as r:
            body = await r.json()
            assert r.status == 429, body
    # long: 60 tokens at 20/s, about 3 s; short: 40 at 100/s, 0.4 s
    assert body["retry_after_ms"] > 1500, body


async def test_a_cancel_of_a_queued_task_answers_canceled(workspace: Workspace, serve: Any) -> None:
    """docs/http.md: the daemon applies a cancel at once, so a queued task's answer is 200
    canceled, each time, not a 202 when the answer outran the loop's next pass."""
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        for n in range(9):
            async with session.post(f"{base}/v1/tasks", json=task(f"q{n}", max_tokens=60)) as r:
                assert r.status == 202
        answers = []
        for n in range(1, 9):  # q0 runs; the rest wait
            async with session.post(f"{base}/v1/tasks/q{n}/cancel") as r:
                answers.append((r.status, (await r.json())["status"]))
    assert answers == [(200, "canceled")] * 8, answers


async def _serve_slow(workspace: Workspace, serve: Any) -> str:
    """A daemon whose sim engine streams 20 tokens/s (a task stays running a while); its URL."""
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    return _url(await serve())


async def _post_until_running(
    session: aiohttp.ClientSession, base: str, workspace: Workspace, task_id: str, max_tokens: int
) -> None:
    async with session.post(f"{base}/v1/tasks", json=task(task_id, max_tokens=max_tokens)) as r:
        assert r.status == 202
    await wait_for(lambda: workspace.result(task_id)["status"] == "running", 10)  # type: ignore[index]


async def test_cancel_over_http_is_idempotent_and_stops_a_running_task(
    workspace: Workspace, serve: Any
) -> None:
    base = await _serve_slow(workspace, serve)
    async with aiohttp.ClientSession() as session:
        await _post_until_running(session, base, workspace, "c1", max_tokens=200)
        for _ in range(2):
            async with session.post(f"{base}/v1/tasks/c1/cancel") as response:
                assert response.status in (200, 202)
        result = await wait_terminal(workspace, "c1")
        assert result["status"] == "canceled"
        async with session.post(f"{base}/v1/tasks/c1/cancel") as response:
            assert (await response.json())["status"] == "canceled"
        async with session.post(f"{base}/v1/tasks/nobody/cancel") as response:
            assert response.status == 404


async def test_a_cancel_racing_the_tasks_end_answers_with_the_end(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task ends while the cancel request is being written: the answer is its final
    status (200), not 202 cancel-requested for a task that already succeeded."""
    import time as clock

    from reconciler import api_tasks

    base = await _serve_slow(workspace, serve)
    real = api_tasks.spool.request_cancel

    def slow_request(the_spool: Any, task_id: str) -> Any:
        end = clock.monotonic() + 15  # the task ends while the request is on its way
        while clock.monotonic() < end and (workspace.result(task_id) or {}).get("status") in (
            None,
            "queued",
            "running",
        ):
            clock.sleep(0.02)
        return real(the_spool, task_id)

    async with aiohttp.ClientSession() as session:
        await _post_until_running(session, base, workspace, "race1", max_tokens=20)
        monkeypatch.setattr(api_tasks.spool, "request_cancel", slow_request)
        async with session.post(f"{base}/v1/tasks/race1/cancel") as response:
            answer = await response.json()
    assert workspace.result("race1")["status"] == "succeeded"  # type: ignore[index]
    assert response.status == 200, answer
    assert answer == {"task_id": "race1", "status": "succeeded"}


async def test_routes_that_take_no_body_refuse_one_instead_of_ignoring_it(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    routes = [
        ("POST", "/v1/tasks/nobody/cancel"),
        ("POST", "/v1/catalog/models/m1/verify"),
        ("DELETE", "/v1/sessions/zz"),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path in routes:
            for body, headers, status, says in [
                (b"cancel it", {"Content-Type": "text/plain"}, 415, "application/json"),
                (b'{"x": 1}', {"Content-Type": "application/json"}, 400, "no fields"),
                (b'{"a": 1, "a": 2}', {"Content-Type": "application/json"}, 400, "repeats"),
                (b"[1]", {"Content-Type": "application/json"}, 400, "JSON object"),
            ]:
                async with session.request(
                    method, base + path, data=body, headers=headers
                ) as response:
                    answer = await response.json()
                assert response.status == status, (method, path, body, answer)
                assert says in answer["message"] + answer.get("hint", ""), (path, answer)
            for empty in (None, {}):  # no body, or {}: as before
                async with session.request(method, base + path, json=empty) as response:
                    assert response.status in (200, 202, 204, 404), (path, response.status)


async def test_an_eventsource_opened_with_the_query_resumes_from_the_header_it_adds(
    workspace: Workspace, serve: Any
) -> None:
    """A browser's EventSource can set no header on its first request, so it is opened with
    ?last_event_id=N; when the connection drops it reconnects to the same URL adding
    Last-Event-ID with the last frame it saw. That reconnect goes on from the header's id
    (a 400 would end the stream: EventSource does not retry a non-200)."""
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("es1", max_tokens=8)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "es1")
        async with session.get(
            f"{base}/v1/tasks/es1/events?last_event_id=2", headers={"Last-Event-ID": "5"}
        ) as response:
            assert response.status == 200
            frames = [f async for f in _sse(response)]
    assert int(frames[0]["id"]) == 6, frames[:2]


async def test_sessions_and_capabilities(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("s1", session_id="agent")) as r:
            assert r.status == 202
        await wait_terminal(workspace, "s1")
        async with session.get(f"{base}/v1/sessions/agent") as response:
            info = await response.json()
        assert info["turns"] == 1 and info["kv_warmth"] is True and info["ttl_ms_remaining"] > 0
        async with session.delete(f"{base}/v1/sessions/agent") as response:
            assert response.status == 204
        async with session.get(f"{base}/v1/sessions/agent") as response:
            assert response.status == 404
        async with session.get(f"{base}/v1/capabilities") as response:
            caps = await response.json()
        assert caps["api_version"] == "1.0.0"
        [pool] = caps["pools"]
        assert pool["pool_id"] == "p1" and pool["ctx"] == 2048 and pool["concurrency"] == 2
        assert pool["engine_version"] == "sim-0.1.0"
        async with session.get(f"{base}/v1/status") as response:
            status = await response.json()
        assert status["daemon"]["url"] == base
        assert status["pools"][0]["replicas"][0]["engine_version"] == "sim-0.1.0"


async def test_every_accepted_session_task_is_told_its_sessions_budgets(
    workspace: Workspace, serve: Any
) -> None:
    """HME-020: the 202 answer (body and X-Budget-Tokens-Remaining), the queued frame, the
    result and the metrics frames carry what the session has left; a task without a session
    carries none."""
    cfg = config(sessions={"ttl_s": 600, "max_turns": 5, "token_budget": 100})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 40, "load_s": 0.0}
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        first = task("bu1", session_id="agent", max_tokens=30)
        async with session.post(f"{base}/v1/tasks", json=first) as r:
            assert r.status == 202
            answer = await r.json()
            # its own max_tokens are held for it: what a next turn may still ask for
            assert r.headers["X-Budget-Tokens-Remaining"] == "70"
        ttl = answer["budgets"].pop("ttl_ms_remaining")
        assert 590_000 <= ttl <= 600_000  # the turn was counted a moment before
        assert answer["budgets"] == {
            "session_id": "agent",
            "turns_remaining": 4,
            "tokens_budget_remaining": 70,
        }
        answer["budgets"]["ttl_ms_remaining"] = ttl
        async with session.get(f"{base}/v1/tasks/bu1/events") as response:
            assert response.headers["X-Budget-Tokens-Remaining"] == "70"
            frames = [f async for f in _sse(response)]
        async with session.head(f"{base}/v1/tasks/bu1/events") as response:  # GET's headers
            assert response.headers["X-Budget-Tokens-Remaining"] == "70"
        queued = next(f for f in frames if f["event"] == "queued")
        assert queued["data"]["budgets"] == answer["budgets"]
        left = [f["data"]["tokens_budget_remaining"] for f in frames if f["event"] == "metrics"]
        assert left and set(left) == {70}  # its tokens come out of what was held for it
        result = workspace.result("bu1")
        assert result is not None and result["budgets"] == answer["budgets"]
        async with session.post(f"{base}/v1/tasks", json=task("bu2", session_id="agent")) as r:
            second = (await r.json())["budgets"]
        assert second["session_id"] == "agent" and second["turns_remaining"] == 3
        # the first turn's unused tokens are free again; the second's 8 are held
        assert second["tokens_budget_remaining"] == 100 - result["tokens_out"] - 8
        async with session.get(f"{base}/v1/sessions/agent") as response:
            info = await response.json()
        # 8 held while the second runs; what it wrote, at most 8, once it has ended
        assert 100 - result["tokens_out"] - 8 <= info["tokens_budget_remaining"] <= 92, info
        async with session.post(f"{base}/v1/tasks", json=task("bu3")) as r:
            assert (await r.json())["budgets"] is None
            assert "X-Budget-Tokens-Remaining" not in r.headers
    assert (await wait_terminal(workspace, "bu3"))["budgets"] is None


async def test_a_turn_evicted_from_the_queue_and_sent_again_is_the_same_turn(
    workspace: Workspace, serve: Any
) -> None:
    """A turn the queue evicted (QUEUE_FULL_DROP_LRU: retry, with the same id) is sent
    again once there is room: it is the turn it was, not one over the session's limit."""
    cfg = config(
        queue={"capacity": 1, "full_policy": "drop-lru"},
        sessions={"ttl_s": 600, "max_turns": 3},
    )
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:

        async def post(task_id: str, **fields: Any) -> tuple[int, dict[str, Any]]:
            body = task(task_id, session_id="agent", **fields)
            async with session.post(f"{base}/v1/tasks", json=body) as r:
                return r.status, await r.json()

        assert (await post("s1", max_tokens=20))[0] == 202  # runs
        assert (await post("s2", max_tokens=3))[0] == 202  # waits (batch)
        assert (await post("s3", max_tokens=3, priority="interactive"))[0] == 202
        evicted = await wait_terminal(workspace, "s2")
        assert evicted["error"]["code"] == "QUEUE_FULL_DROP_LRU", evicted
        await wait_for(lambda: (workspace.result("s3") or {}).get("status") == "running", 15)
        status, answer = await post("s2", max_tokens=3)
        assert status == 202, answer
        assert (await wait_terminal(workspace, "s2"))["status"] == "succeeded"
        async with session.get(f"{base}/v1/sessions/agent") as response:
            assert (await response.json())["turns"] == 3


async def test_a_session_task_asking_for_more_than_its_budget_has_left_is_refused(
    workspace: Workspace, serve: Any
) -> None:
    """A budget of 500 tokens: two tasks of 200 may run; a third asking for 200 with 100
    left (or with the others still running) would overspend it, so it is refused with how
    many tokens it may ask for; one asking for 100 is taken."""
    cfg = config(sessions={"ttl_s": 600, "max_turns": 8, "token_budget": 500})
    cfg["pools"][0]["slots"] = 4
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        for i in (1, 2):
            body = task(f"s{i}", session_id="agent", max_tokens=200)
            async with session.post(f"{base}/v1/tasks", json=body) as r:
                assert r.status == 202
        body = task("s3", session_id="agent", max_tokens=200)
        async with session.post(f"{base}/v1/tasks", json=body) as r:
            refused = await r.json()
            assert r.status == 409 and refused["code"] == "SESSION_BUDGET_EXCEEDED", refused
            assert "(100, counting its tasks still queued or running)" in refused["message"]
            assert refused["hint"] == "lower max_tokens to 100, or start a new session_id"
        body = task("s4", session_id="agent", max_tokens=100)
        async with session.post(f"{base}/v1/tasks", json=body) as r:
            assert r.status == 202
    for task_id in ("s1", "s2", "s4"):
        await wait_terminal(workspace, task_id)
    spent = sum(workspace.result(t)["tokens_out"] for t in ("s1", "s2", "s4"))  # type: ignore[index]
    assert spent <= 500


async def test_a_damaged_session_file_is_said_lost_and_replaced_at_the_next_turn(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    record = workspace.root / ".orch" / "sessions" / "agent.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text('{"session_id": "agent", "turns": ')  # cut short
    caplog.set_level("WARNING", logger="llama_orch")
    await serve()
    workspace.submit("d1.task.yaml", task("d1", session_id="agent"))
    assert (await wait_terminal(workspace, "d1"))["status"] == "succeeded"
    lost = [r for r in caplog.records if getattr(r, "orch_event", "") == "session.record_lost"]
    assert lost and str(record) in lost[0].getMessage(), caplog.text
    assert json.loads(record.read_text())["turns"] == 1  # a whole record again


async def test_x_session_id_puts_a_posted_task_in_that_session(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        headers = {"X-Session-Id": "agent-9"}
        async with session.post(f"{base}/v1/tasks", json=task("x1"), headers=headers) as r:
            assert r.status == 202 and (await r.json())["budgets"]["session_id"] == "agent-9"
        body = task("x2", session_id="other")
        async with session.post(f"{base}/v1/tasks", json=body, headers=headers) as r:
            refused = await r.json()
            assert r.status == 400 and refused["message"].startswith("session_id: "), refused
    assert (await wait_terminal(workspace, "x1"))["session_id"] == "agent-9"
    assert workspace.result("x2") is None


async def test_a_stalled_client_does_not_hold_up_another_clients_tokens(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0].update(ctx=8192, sim={"tokens_per_s": 2000, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    base = _url(running)
    host, port = base.removeprefix("http://").split(":")
    workspace.submit("flood.task.yaml", task("flood", max_tokens=1500, prompt="x " * 100))
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/tasks/flood/events HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()  # and never read a byte
    try:
        async with aiohttp.ClientSession() as session:
            frames = await asyncio.wait_for(
                _frames(session, f"{base}/v1/tasks/flood/events"), timeout=30
            )
        assert frames[-1]["event"] == "end"
        assert sum(f["event"] == "token" for f in frames) == 1500
    finally:
        writer.close()


def _auth_config(optional: bool) -> desired.DesiredState:
    return desired.DesiredState.model_validate(
        config(auth={"token_env": "TEST_ORCH_TOKEN", "optional_on_loopback": optional})
    )


def _token_everywhere(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> str:
    """orch.yaml asking every caller, loopback too, for the token (returned)."""
    token = "feedfacefeedface1234"
    monkeypatch.setenv("TEST_ORCH_TOKEN", token)
    workspace.write_config(
        config(
            server={"bind": "127.0.0.1:0"},
            auth={"token_env": "TEST_ORCH_TOKEN", "optional_on_loopback": False},
        )
    )
    return token


async def test_a_stopping_daemon_refuses_new_tasks_at_once_and_delivers_nothing(
    workspace: Workspace, serve: Any
) -> None:
    running, base = await _slow_daemon(workspace, serve, tokens_per_s=20)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("long", max_tokens=40)) as r:
            assert r.status == 202
        await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
        running.daemon.stop("a test")  # drains: the running task finishes first
        for path, body in [
            ("/v1/tasks", task("late")),
            (
                "/v1/chat/completions",
                {"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
            ),
        ]:
            t0 = time.monotonic()
            async with session.post(f"{base}{path}", json=body) as r:
                answer = await r.json()
                assert time.monotonic() - t0 < 2  # at once, not after the drain
                assert r.status == 503 and r.headers["Retry-After"] == "5"
            code = answer["error"]["code"] if "error" in answer else answer["code"]
            assert code == "DAEMON_STOPPING", answer
    assert list(workspace.spool.incoming.iterdir()) == []
    assert workspace.result("late") is None
    assert (await wait_terminal(workspace, "long"))["status"] == "succeeded"


async def test_stream_routes_answer_head_and_query_flags_and_content_types_are_checked(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("h1")) as r:
            assert r.status == 202
        for path in ("/v1/tasks/h1/events", "/v1/status/events"):
            async with session.head(f"{base}{path}") as r:
                assert r.status == 200 and r.content_type == "text/event-stream", path
                assert await r.read() == b""
        for value in ("maybe", "true&cancel_on_disconnect=false"):
            url = f"{base}/v1/tasks/h1/events?cancel_on_disconnect={value}"
            async with session.get(url) as r:
                body = await r.json()
                assert r.status == 400 and "cancel_on_disconnect" in body["message"], body
        for query, said in [
            ("cancel_on_disconect=true", "(did you mean cancel_on_disconnect?)"),
            ("foo=1", "?foo: this route takes no such query parameter"),
        ]:
            async with session.get(f"{base}/v1/tasks/h1/events?{query}") as r:
                body = await r.json()
                assert r.status == 400 and said in body["message"], body
        async with session.get(f"{base}/v1/artifacts?kind=plan&kind=diff") as r:
            body = await r.json()
            assert r.status == 400 and body["message"] == "?kind is given more than once"
        # every route: a query parameter it does not take is refused, never ignored
        for method, path in [
            ("GET", "/v1/pools?limt=5"),
            ("GET", "/v1/status?verbose=1"),
            ("GET", "/v1/tasks/h1?wait=true"),
            ("POST", "/v1/tasks/h1/cancel?force=1"),
            ("GET", "/metrics?name=x"),
        ]:
            async with session.request(method, f"{base}{path}") as r:
                body = await r.json()
                name = path.split("?")[1].split("=")[0]
                assert r.status == 400, (path, body)
                assert body["message"].startswith(f"?{name}: this route takes no such"), body
                assert body["hint"] == "send none", body
        async with session.get(f"{base}/v1/artifacts?lmit=2") as r:  # one it does take, near
            body = await r.json()
            assert r.status == 400 and "(did you mean limit?)" in body["message"], body
            assert body["hint"] == "its parameters: kind, limit, tag", body
        # OpenAI's routes and the status page ignore theirs, as OpenAI's API and a page do
        for path in ("/v1/models?api-version=1", "/?refresh=1"):
            async with session.get(f"{base}{path}") as r:
                assert r.status == 200, path
        async with session.post(
            f"{base}/v1/chat/completions?api-version=1", json={"model": "nope", "messages": []}
        ) as r:
            body = await r.json()
            assert r.status != 200 and "api-version" not in json.dumps(body), body
        async with session.post(
            f"{base}/v1/tasks", data=b"{}", skip_auto_headers=["Content-Type"]
        ) as r:
            body = await r.json()
            assert r.status == 415 and "has no Content-Type" in body["message"], body
    assert (await wait_terminal(workspace, "h1"))["status"] == "succeeded"


def test_the_six_auth_scenarios(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    token = "0123456789abcdef0123"
    monkeypatch.delenv("TEST_ORCH_TOKEN", raising=False)
    # 1: loopback, optional, no token → allowed as localhost
    auth = api_auth.load(_auth_config(True), tmp_path, bind_host="127.0.0.1")
    assert api_auth.check(auth, remote="127.0.0.1", header=None).identity == "localhost"
    for key in ("Bearer sk-anything", "Bearer ", "Bearer", "Basic dXNlcjpwdw==", "Token x"):
        assert api_auth.check(auth, remote="::1", header=key).identity == "localhost", key
    # 3: a non-loopback bind without a token refuses to start
    with pytest.raises(errors.ConfigProblem, match="no API token is set"):
        api_auth.load(_auth_config(True), tmp_path, bind_host="0.0.0.0")
    monkeypatch.setenv("TEST_ORCH_TOKEN", token)
    auth = api_auth.load(_auth_config(False), tmp_path, bind_host="0.0.0.0")
    # 2: loopback, not optional, no token → 401 MISSING_TOKEN
    assert api_auth.check(auth, remote="127.0.0.1", header=None).code == "MISSING_TOKEN"
    # 4: a wrong token → 401 BAD_TOKEN
    assert api_auth.check(auth, remote="10.0.0.2", header="Bearer nope").code == "BAD_TOKEN"
    for scheme in ("bearer", "BEARER"):  # RFC 9110: the scheme is matched in any case
        verdict = api_auth.check(auth, remote="10.0.0.2", header=f"{scheme} {token}")
        assert verdict.identity == f"token:{api_auth.fingerprint(token)}", scheme
    assert api_auth.check(auth, remote="10.0.0.2", header=f"Basic {token}").code == "BAD_TOKEN"
    # 5: the right token → its fingerprint, never the token
    verdict = api_auth.check(auth, remote="10.0.0.2", header=f"  Bearer {token} ")
    assert verdict.identity == f"token:{api_auth.fingerprint(token)}" and token not in str(verdict)
    # 6: a remote caller without a token → 401
    assert api_auth.check(auth, remote="10.0.0.2", header=None).code == "MISSING_TOKEN"


def test_a_token_asked_of_every_caller_but_missing_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """optional_on_loopback: false with no token (the variable unset, the token file
    empty): nobody could be asked for it, so the API would be open to every local caller.
    The daemon refuses to start, naming what to set."""
    monkeypatch.delenv("TEST_ORCH_TOKEN", raising=False)
    with pytest.raises(api_auth.Refused, match="every caller needs the API token") as refused:
        api_auth.load(_auth_config(False), tmp_path, bind_host="127.0.0.1")
    assert refused.value.field == "auth.optional_on_loopback"
    assert "export TEST_ORCH_TOKEN=" in (refused.value.fix or "")
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty.chmod(0o600)
    cfg = desired.DesiredState.model_validate(config(auth={"token_file": str(empty)}))
    with pytest.raises(api_auth.Refused, match="is empty: no API token"):
        api_auth.load(cfg, tmp_path, bind_host="127.0.0.1")


def test_the_pretty_log_shows_what_a_client_sent_on_one_line_escaped() -> None:
    """A path a client sent, logged by a refusal: its newline must not forge a log line,
    nor its escape sequences drive the terminal (the JSON format escapes them too)."""
    record = logging.LogRecord(
        "llama_orch.http", 30, "", 0, "Refused GET /v1/x\n12:00:00.000 INFO ok\x1b[2J\x07", (), None
    )
    line = logs.PrettyFormatter(color=False).format(record)
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line, repr(line)
    assert line.endswith("Refused GET /v1/x\\n12:00:00.000 INFO ok\\x1b[2J\\x07")


def test_tokens_http_clients_cannot_send_are_refused_and_a_readable_token_file_warned(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("TEST_ORCH_TOKEN", "é" * 20)  # curl sends it; SDKs cannot
    with pytest.raises(errors.ConfigProblem, match="printable ASCII"):
        api_auth.load(_auth_config(True), tmp_path, bind_host="127.0.0.1")
    monkeypatch.delenv("TEST_ORCH_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("0123456789abcdef0123\n")
    token_file.chmod(0o644)
    cfg = config(auth={"token_file": str(token_file)})
    auth = api_auth.load(desired.DesiredState.model_validate(cfg), tmp_path, bind_host="0.0.0.0")
    assert auth.token == "0123456789abcdef0123"
    assert auth.warnings == (
        f"auth.token_file {token_file} may be read by other users (mode 644): "
        f"chmod 600 {token_file}",
    )
    token_file.chmod(0o600)
    auth = api_auth.load(desired.DesiredState.model_validate(cfg), tmp_path, bind_host="0.0.0.0")
    assert auth.warnings == ()


async def test_a_network_bind_exempts_only_requests_naming_a_loopback_host(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bound to 0.0.0.0 with a token, loopback callers skip it; a web page whose own domain
    was pointed at 127.0.0.1 (DNS rebinding) reaches loopback too, but names its domain."""
    token = "feedfacefeedface1234"
    monkeypatch.setenv("TEST_ORCH_TOKEN", token)
    workspace.write_config(
        config(server={"bind": "0.0.0.0:0"}, auth={"token_env": "TEST_ORCH_TOKEN"})
    )
    running = await serve()
    port = _url(running).rsplit(":", 1)[1]
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/capabilities") as response:
            assert response.status == 200  # curl on this machine: no token needed
        rebound = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        async with session.get(f"{base}/v1/status", headers=rebound) as response:
            body = await response.json()
            assert response.status == 401 and body["code"] == "MISSING_TOKEN"
            assert "'evil.example:" in body["message"]
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="llama-orch"'
        async with session.post(f"{base}/v1/tasks", json=task("r1"), headers=rebound) as r:
            assert r.status in (401, 403)
        with_token = {**rebound, "Authorization": f"bearer {token}"}
        async with session.get(f"{base}/v1/status", headers=with_token) as response:
            assert response.status == 200  # a caller with the token may name any host
        # relayed by a reverse proxy on this machine (docs/security.md's nginx): from
        # elsewhere, however loopback its connection is
        for relayed in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
            async with session.post(f"{base}/v1/pools/p1/drain", headers=relayed) as r:
                body = await r.json()
                assert r.status == 401 and "relayed by a proxy" in body["message"], body
            relayed_with_token = {**relayed, "Authorization": f"Bearer {token}"}
            async with session.get(f"{base}/v1/status", headers=relayed_with_token) as r:
                assert r.status == 200
    assert not (workspace.root / "results" / "r1.json").exists()
    assert list(workspace.spool.incoming.iterdir()) == []


async def test_a_malformed_host_or_a_foreign_referer_is_refused(
    workspace: Workspace, serve: Any
) -> None:
    """`Host: localhost:8080@evil.com` passed as localhost and came back in an artifact's
    URL; a page sending no Origin nor Sec-Fetch-* (an older browser's <img>) could cancel a
    task on disconnect: its Referer names the other site."""
    running = await serve()
    base = _url(running)
    port = base.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        for host in (f"localhost:{port}@evil.com", "[::1]evil", "127.0.0.1:abc"):
            plan = {"kind": "plan", "content": "x"}
            async with session.post(f"{base}/v1/artifacts", json=plan, headers={"Host": host}) as r:
                body = await r.json()
                assert r.status == 403 and body["code"] == "FORBIDDEN_ORIGIN", (host, body)
        async with session.post(f"{base}/v1/tasks", json=task("ref1", max_tokens=400)) as r:
            assert r.status == 202
        foreign = {"Referer": "http://evil.example/page.html"}
        url = f"{base}/v1/tasks/ref1/cancel"
        async with session.post(url, headers=foreign) as r:
            assert r.status == 403 and "evil.example" in (await r.json())["message"]
        async with session.post(url, headers={"Referer": f"{base}/"}) as r:
            assert r.status in (200, 202)  # the daemon's own page


async def test_a_malformed_request_is_answered_with_the_envelope_and_never_shows_its_bytes(
    workspace: Workspace, serve: Any, json_log: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = _token_everywhere(workspace, monkeypatch)
    running = await serve()
    host, port = _url(running).removeprefix("http://").rsplit(":", 1)

    async def raw(request: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, json.loads(body)

    # a token file saved with CRLF line endings: the header value ends in a stray CR
    status, headers, body = await raw(
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {token}\r\r\n\r\n".encode()
    )
    assert status == 400 and body["code"] == "INVALID_PARAMS" and body["hint"]
    assert body["message"].startswith("the HTTP request could not be read: ")
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Correlation-Id"]
    status, _, body = await raw(
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        + b"a" * 9000
        + f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    assert status == 431 and body["message"] == "a header line is over 8190 bytes"
    status, _, body = await raw(
        b"GET /v1/pools?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    assert status == 414 and body["message"] == "the request line is over 8190 bytes", body
    assert body["hint"] == "shorten the URL"
    # under OpenAI's routes, in OpenAI's shape: an SDK reads its error
    status, _, body = await raw(
        b"POST /v1/chat/completions?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    assert status == 414 and body["error"]["type"] == "invalid_request_error", body
    assert body["error"]["message"] == "the request line is over 8190 bytes"
    status, _, body = await raw(
        b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    assert status == 414 and body["error"]["code"] == "INVALID_PARAMS", body
    log_text = json_log.getvalue()
    assert token not in log_text and "aaaaaaaa" not in log_text
    assert log_text.count("http.malformed_request") == 5


async def test_expect_is_answered_before_the_body_in_the_envelope(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    host, port = base.removeprefix("http://").rsplit(":", 1)

    async def head_only(request: bytes) -> tuple[int, dict[str, Any]]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)  # the headers only: the body is not sent
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        writer.close()
        return int(head.split()[1]), json.loads(body)

    status, body = await head_only(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n"
    )
    assert status == 413 and body["code"] == "PAYLOAD_TOO_LARGE", body
    assert "5000000 bytes" in body["message"]
    status, body = await head_only(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n"
    )
    assert status == 417 and "Expect: 200-ok is not supported" in body["message"], body
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/tasks", json=task("e1"), expect100=True) as r,
    ):
        assert r.status == 202  # a body within the limit goes on as before
    await wait_terminal(workspace, "e1")


async def test_expect_100_continue_is_given_only_to_a_request_that_passes_the_token_check(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No body is invited from a client the answer will refuse: without the token, the 401
    comes where the 100 Continue would have, and nothing is queued."""
    token = _token_everywhere(workspace, monkeypatch)
    running = await serve()
    host, port = _url(running).removeprefix("http://").rsplit(":", 1)
    body = json.dumps(task("x1")).encode()

    async def first_answer(auth: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + auth
            + f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        return head

    head = await first_answer(b"")
    assert head.startswith(b"HTTP/1.1 401 "), head
    assert b"connection: close" in head.lower()
    head = await first_answer(b"Authorization: Bearer wrong-token-0000\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), head
    head = await first_answer(f"Authorization: Bearer {token}\r\n".encode())
    assert head.startswith(b"HTTP/1.1 100 Continue"), head
    assert not (workspace.root / "results" / "x1.json").exists()


async def test_a_body_unlike_its_content_encoding_is_a_400_naming_the_header_and_the_daemon_goes_on(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    import gzip
    import zlib

    running = await serve()
    base = _url(running)
    host, port = base.removeprefix("http://").rsplit(":", 1)

    async def raw(path: str, coding: bytes, body: bytes) -> tuple[int, bytes, dict[str, Any]]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Encoding: "
            + coding
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        rest = await asyncio.wait_for(reader.readexactly(length), 10)
        writer.close()
        return int(head.split()[1]), head, json.loads(rest)

    plain = json.dumps(task("g1")).encode()
    status, _, body = await raw("/v1/tasks", b"gzip", plain)  # says gzip, is not
    assert status == 400 and body["code"] == "INVALID_PARAMS", body
    assert "Content-Encoding gzip" in body["message"] and "uncompressed" in body["hint"]
    status, _, body = await raw("/v1/chat/completions", b"deflate", b'{"model": "m1"}')
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    assert "Content-Encoding deflate" in body["error"]["message"]
    chat = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    whole = {b"gzip": gzip.compress(chat), b"deflate": zlib.compress(chat)}
    raw_deflate = zlib.compressobj(wbits=-15)
    whole[b"deflate "] = raw_deflate.compress(chat) + raw_deflate.flush()  # no zlib header
    for coding, data in whole.items():
        # cut short anywhere (even only its checksum), or followed by more: never read as whole
        for bad in (data[:-1], data[:-4], data[: len(data) // 2], data + b"{}"):
            status, _, body = await raw("/v1/chat/completions", coding.strip(), bad)
            assert status == 400, (coding, len(bad), body)
            error = body["error"]
            assert error["type"] == "invalid_request_error", body  # OpenAI's shape there
            assert f"Content-Encoding {coding.strip().decode()}" in error["message"], body
            assert "cut short" in error["message"] and "whole" in body["error"]["hint"], body
    bomb = gzip.compress(b" " * (2 * 1024 * 1024) + b"{}")  # a few KiB, 2 MiB decoded
    status, _, body = await raw("/v1/tasks", b"gzip", bomb)
    assert status == 413 and body["code"] == "PAYLOAD_TOO_LARGE", body
    other = json.dumps(task("g0")).encode()
    members = gzip.compress(other[:10]) + gzip.compress(other[10:])  # two members: one body
    status, _, body = await raw("/v1/tasks", b"gzip", members)
    assert status == 202, body
    status, _, body = await raw("/v1/tasks", b"gzip, gzip", gzip.compress(plain))
    assert status == 415 and body["code"] == "UNSUPPORTED_MEDIA_TYPE", body
    assert "'gzip, gzip'" in body["message"]
    status, _, body = await raw("/v1/tasks/g1/cancel", b"gzip", b"not gzip")  # held to it too
    assert status == 400 and "Content-Encoding gzip" in body["message"], body
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/v1/tasks",
            data=gzip.compress(plain),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as response:
            assert response.status == 202, await response.text()  # real gzip is read
        await wait_terminal(workspace, "g1")
        async with session.get(f"{base}/v1/status") as response:
            assert response.status == 200
    log_text = json_log.getvalue()
    assert "Traceback" not in log_text and "Unhandled exception" not in log_text, log_text


async def test_a_body_that_trickles_in_is_cut_off_with_a_408_and_the_daemon_goes_on(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler import api

    monkeypatch.setattr(api, "BODY_READ_S", 0.5)
    running = await serve()
    base = _url(running)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await writer.drain()
    t0 = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    body = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    writer.close()
    assert time.monotonic() - t0 < 5
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head, head
    assert "did not arrive within 0.5 s (100 bytes announced)" in body["message"], body
    assert body["hint"] == "send the whole body right after the headers"
    async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/status") as r:
        assert r.status == 200


async def test_a_connection_that_sends_no_whole_request_is_closed_after_the_keepalive_limit(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and says nothing, one that trickles its headers a byte at a
    time, and one idle after its answer each hold a descriptor: closed after KEEPALIVE_S,
    while a request that completes in time is answered."""
    from reconciler import api

    monkeypatch.setattr(api, "KEEPALIVE_S", 1.0)
    running = await serve()
    host, port = _url(running).removeprefix("http://").rsplit(":", 1)

    async def closed_after(send: bytes, trickle: bool) -> float:
        reader, writer = await asyncio.open_connection(host, int(port))
        t0 = time.monotonic()

        async def write() -> None:
            for i in range(len(send)):
                writer.write(send[i : i + 1] if trickle else send[i:])
                await writer.drain()
                if not trickle:
                    return
                await asyncio.sleep(0.1)

        writing = asyncio.create_task(write())
        try:
            while await asyncio.wait_for(reader.read(65536), 10):  # an answer, then the end
                pass
        finally:
            writing.cancel()
            writer.close()
        return time.monotonic() - t0

    request = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    silent, trickled, idle = await asyncio.gather(
        closed_after(b"", False),
        closed_after(request + b"X-Slow: " + b"a" * 200, True),  # never ends its headers
        closed_after(request + b"\r\n", False),  # answered, then kept alive, idle
    )
    for took in (silent, trickled, idle):
        assert 0.9 <= took < 5, (silent, trickled, idle)
    async with aiohttp.ClientSession() as session, session.get(f"{_url(running)}/v1/status") as r:
        assert r.status == 200


async def test_a_token_protected_daemon_answers_401_and_logs_identities_not_tokens(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = _token_everywhere(workspace, monkeypatch)
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/capabilities") as response:
            body = await response.json()
            assert response.status == 401 and body["code"] == "MISSING_TOKEN" and body["hint"]
        bad = {"Authorization": "Bearer wrong-token-0000000"}
        async with session.get(f"{base}/v1/capabilities", headers=bad) as response:
            assert response.status == 401 and (await response.json())["code"] == "BAD_TOKEN"
        good = {"Authorization": f"Bearer {token}"}
        async with session.post(f"{base}/v1/tasks", json=task("a1"), headers=good) as response:
            assert response.status == 202


async def test_the_correlation_id_of_a_request_is_on_every_log_line_of_its_task(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    running = await serve()
    base = _url(running)
    caplog.set_level("INFO", logger="llama_orch")
    async with aiohttp.ClientSession() as session:
        headers = {"X-Correlation-Id": "trace-77"}
        async with session.post(f"{base}/v1/tasks", json=task("k1"), headers=headers) as r:
            assert r.status == 202
    await wait_terminal(workspace, "k1")
    await wait_for(
        lambda: any(getattr(r, "orch_event", "") == "task.succeeded" for r in caplog.records)
    )
    about = [r for r in caplog.records if getattr(r, "orch_fields", {}).get("task_id") == "k1"]
    events = {r.orch_event for r in about}  # type: ignore[attr-defined]
    assert {"http.task_delivered", "task.queued", "placement.decided", "task.succeeded"} <= events
    assert {r.orch_fields["correlation_id"] for r in about} == {"trace-77"}  # type: ignore[attr-defined]
    # the numbers the human text says are fields too, for a log query
    fields = {r.orch_event: r.orch_fields for r in about}  # type: ignore[attr-defined]
    assert fields["task.queued"]["predicted_start_ms"] is not None
    done = fields["task.succeeded"]
    assert done["tokens_out"] == 8 and done["decode_time_ms"] is not None
    assert done["first_token_ms"] is not None and done["queue_ms"] is not None


async def test_other_web_sites_cannot_write_and_rebound_host_names_are_refused(
    workspace: Workspace, serve: Any
) -> None:
    _running, base = await _slow_daemon(workspace, serve, tokens_per_s=20)
    port = base.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("x1", max_tokens=100)) as r:
            assert r.status == 202
        evil = {"Origin": "http://evil.example"}
        async with session.post(f"{base}/v1/tasks/x1/cancel", headers=evil) as response:
            body = await response.json()
            assert response.status == 403 and body["code"] == "FORBIDDEN_ORIGIN"
        cross = {"Sec-Fetch-Site": "cross-site"}
        async with session.post(f"{base}/v1/tasks", json=task("x2"), headers=cross) as r:
            assert r.status == 403
        # a read that would cancel the task when the browser drops it (an <img>, an
        # EventSource of another site, or of a page on another port of this host: the same
        # site to a browser, not the same origin) is a write too; a plain read is not
        same_site = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Dest": "image"}
        for headers in (cross, evil, same_site):
            url = f"{base}/v1/tasks/x1/events?cancel_on_disconnect=true"
            async with session.get(url, headers=headers) as response:
                body = await response.json()
                assert response.status == 403 and body["code"] == "FORBIDDEN_ORIGIN", body
        async with session.get(f"{base}/v1/tasks/x1?", headers=cross) as response:
            assert response.status == 200
        assert (workspace.result("x1") or {}).get("status") in ("queued", "running")
        rebound = {"Host": f"attacker.example:{port}"}
        async with session.get(f"{base}/v1/status", headers=rebound) as response:
            assert response.status == 403
        own = {"Origin": f"http://127.0.0.1:{port}"}  # the status page's own button
        async with session.post(f"{base}/v1/tasks/x1/cancel", headers=own) as response:
            assert response.status in (200, 202)
    assert (await wait_terminal(workspace, "x1"))["status"] == "canceled"
    assert workspace.result("x2") is None


async def test_cancel_on_disconnect_cancels_soon_after_the_client_leaves_with_nothing_sent(
    workspace: Workspace, serve: Any
) -> None:
    """The client of a stream opened with ?cancel_on_disconnect=true leaves while nothing is
    being sent (a queued task, or a running one resumed past its last frame): its task is
    canceled within about a second, not at the next keep-alive comment 15 s on, or never,
    and a task abandoned while queued never takes a slot."""
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        for task_id in ("busy", "waiting"):
            async with session.post(f"{base}/v1/tasks", json=task(task_id, max_tokens=200)) as r:
                assert r.status == 202
        await wait_for(lambda: (workspace.result("busy") or {}).get("status") == "running", 10)
        cases = [("waiting", {}), ("busy", {"Last-Event-ID": "99999"})]  # nothing to send
        for task_id, headers in cases:
            url = f"{base}/v1/tasks/{task_id}/events?cancel_on_disconnect=true"
            response = await session.get(url, headers=headers)
            assert response.status == 200
            if not headers:
                first = await anext(_sse(response))
                assert first["event"] == "queued", first
            await asyncio.sleep(0.3)
            response.close()  # the client leaves
            left = time.monotonic()
            ended = await wait_terminal(workspace, task_id, timeout=5)
            assert ended["status"] == "canceled", ended
            assert time.monotonic() - left < 3
            if task_id == "waiting":
                assert ended["timings"]["started_at"] is None, ended  # never took the slot
                assert workspace.result("busy")["status"] == "running"  # type: ignore[index]


async def test_a_commit_the_disk_refuses_does_not_turn_a_post_or_a_stream_into_an_error(
    workspace: Workspace, serve: Any
) -> None:
    """POST /v1/tasks and the SSE stream wait for the task's pending writes; when the disk
    refuses that commit (a full disk), they still answer as before instead of failing the
    request, and the task is retried once the disk takes writes again."""
    from state import failpoints

    base = _url(await serve())
    failpoints.configure("before_group_sync=enospc@1")
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{base}/v1/tasks", json=task("full1", max_tokens=3)) as r:
                assert r.status == 202
                assert (await r.json())["task_id"] == "full1"
            async with session.get(f"{base}/v1/tasks/full1/events") as response:
                assert response.status == 200
                frames = [f async for f in _sse(response)]
        assert frames[-1]["event"] in ("end", "error")
    finally:
        failpoints.configure("")
    result = await wait_terminal(workspace, "full1", 20)
    assert result["status"] in ("succeeded", "failed")


async def test_a_task_whose_queued_result_waits_for_its_commit_is_served_not_404(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task dropped into the spool is known to the daemon (its queued frame is logged)
    while its queued result still waits in the group commit: GET /v1/tasks/{id} answers
    with that result, not 404; two turns of one session taken in the same pass are each told
    the budgets as at their own acceptance."""
    from reconciler import tasking

    monkeypatch.setattr(tasking, "COMMIT_WINDOW_S", 0.4)
    cfg = config(sessions={"ttl_s": 600, "max_turns": 5})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    base = _url(await serve())
    workspace.submit("w1.task.yaml", task("w1", session_id="agent", max_tokens=40))
    workspace.submit("w2.task.yaml", task("w2", session_id="agent", max_tokens=40))
    await wait_for(lambda: workspace.frames("w1"), 5, "w1's queued frame")
    async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/tasks/w1") as response:
        assert response.status == 200
        assert (await response.json())["status"] in ("queued", "running")
    turns = {
        t: next(f for f in workspace.frames(t) if f.event == "queued").data["budgets"]
        for t in ("w1", "w2")
    }
    assert (turns["w1"]["turns_remaining"], turns["w2"]["turns_remaining"]) == (4, 3)


async def test_posts_of_one_task_id_at_once_get_one_202_and_409s_and_it_runs_once(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:

        async def post(i: int) -> tuple[int, dict[str, Any]]:
            body = task("same", prompt=f"race {i}", max_tokens=4)
            async with session.post(f"{base}/v1/tasks", json=body) as response:
                return response.status, await response.json()

        answers = await asyncio.gather(*(post(i) for i in range(6)))
        statuses = sorted(status for status, _ in answers)
        assert statuses == [202, 409, 409, 409, 409, 409], answers
        assert all(b["code"] == "DUPLICATE_TASK_ID" for s, b in answers if s == 409)
        result = await wait_terminal(workspace, "same")
        assert result["status"] == "succeeded"
    assert list(workspace.spool.failed.iterdir()) == []  # no second file was delivered


async def test_a_post_whose_id_a_dropped_file_takes_at_once_is_told_409_not_the_other_task(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task file naming the same task id lands in spool/incoming/ under another name at the
    moment a POST delivers its own: the file claimed first (the dropped one, older) is the
    task; the POST is answered 409 naming that file, never 202 with the other task's place
    (its client would stream a task it did not send)."""
    from state import spool as spool_module

    running = await serve()
    real_deliver = spool_module.deliver

    def deliver_after_a_drop(the_spool: Any, data: bytes, *, name: str) -> Any:
        if name == "twin.task.json":  # the other writer's file lands first
            real_deliver(
                the_spool, json.dumps(task("twin", prompt="dropped")).encode(), name="a.task.json"
            )
        return real_deliver(the_spool, data, name=name)

    monkeypatch.setattr(spool_module, "deliver", deliver_after_a_drop)
    async with aiohttp.ClientSession() as session:
        body = task("twin", prompt="posted", max_tokens=4)
        async with session.post(f"{_url(running)}/v1/tasks", json=body) as response:
            answer = await response.json()
            assert response.status == 409, answer
    assert answer["code"] == "DUPLICATE_TASK_ID", answer
    assert "spool/active/a.task.json" in answer["message"], answer
    result = await wait_terminal(workspace, "twin")
    assert result["status"] == "succeeded" and result["source_file"] == "spool/done/a.task.json"
    # the posted file is refused beside its reason, as any duplicate
    assert (workspace.spool.failed / "twin.task.json.error.json").exists()


async def test_an_id_whose_result_was_removed_but_whose_log_remains_stays_used(
    workspace: Workspace, serve: Any
) -> None:
    """A finished task's result file removed by hand, its event log kept: a POST of that id
    is 409 (not a 202 read from the old log), and a task file of that id is refused as a
    duplicate beside its reason; the old log is left as it was, nothing fails as a bug."""
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("old", max_tokens=3)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "old")
        log_path = workspace.root / "results" / "old.events.jsonl"
        before = log_path.read_bytes()
        (workspace.root / "results" / "old.json").unlink()
        async with session.post(f"{base}/v1/tasks", json=task("old", prompt="again")) as r:
            body = await r.json()
            assert r.status == 409 and body["code"] == "DUPLICATE_TASK_ID", body
            assert "event log" in body["message"], body
        workspace.submit("again.task.yaml", task("old", prompt="again"))
        error = workspace.spool.failed / "again.task.yaml.error.json"
        await wait_for(error.exists, 10, "the dropped file refused")
        record = json.loads(error.read_text())
        assert record["code"] == "DUPLICATE_TASK_ID", record
        assert "old.events.jsonl" in record["message"], record
    assert log_path.read_bytes() == before
    assert workspace.result("old") is None


async def test_a_finished_task_whose_log_was_cut_or_removed_ends_its_stream(
    workspace: Workspace, serve: Any
) -> None:
    """A finished task's event log cut before its terminal frame, or removed, by hand: the
    stream sends what the log has and ends (a reconnect after it is 204), or is a 404 naming
    the missing log; it never waits for frames that cannot come."""
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("cut", max_tokens=3)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "cut")
        log_path = workspace.root / "results" / "cut.events.jsonl"
        lines = log_path.read_bytes().splitlines(keepends=True)
        log_path.write_bytes(b"".join(lines[:-1]))  # the terminal frame gone
        url = f"{base}/v1/tasks/cut/events"
        frames = await asyncio.wait_for(_frames(session, url), 5)
        assert [int(f["id"]) for f in frames] == list(range(1, len(lines))), frames
        async with session.get(url, headers={"Last-Event-ID": str(len(lines) - 1)}) as r:
            assert r.status == 204
        log_path.write_bytes(lines[0][:10])  # cut inside its first frame: there, but empty
        async with session.get(url) as r:
            body = await r.json()
            assert r.status == 404 and "holds no whole frame" in body["message"], body
        log_path.unlink()
        async with session.get(url) as r:
            body = await r.json()
            assert r.status == 404 and "cut.events.jsonl is gone" in body["message"], body
            assert body["hint"] == "GET /v1/tasks/cut for its result"


async def test_a_line_of_an_event_log_changed_by_hand_is_left_out_not_a_500(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A line in the middle of a finished task's log that is no frame: the stream serves the
    frames around it (a resume past it too) and the log says which line, instead of a 500
    that called itself a bug and named no file."""
    caplog.set_level("WARNING", logger="llama_orch")
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("hurt", max_tokens=4)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "hurt")
        log_path = workspace.root / "results" / "hurt.events.jsonl"
        lines = log_path.read_bytes().splitlines(keepends=True)
        lines[2] = b"{garbage\n"
        log_path.write_bytes(b"".join(lines))
        url = f"{base}/v1/tasks/hurt/events"
        frames = await asyncio.wait_for(_frames(session, url), 5)
        ids_seen = [int(f["id"]) for f in frames]
        assert ids_seen == [n for n in range(1, len(lines) + 1) if n != 3], frames
        assert frames[-1]["event"] == "end"
        resumed = await asyncio.wait_for(_frames(session, url + "?last_event_id=3"), 5)
        assert [int(f["id"]) for f in resumed] == list(range(4, len(lines) + 1))
    said = [
        r.getMessage() for r in caplog.records if getattr(r, "orch_event", "") == "events.damaged"
    ]
    assert said and "hurt.events.jsonl: line 3 is not an event frame" in said[0], said


async def test_a_result_file_damaged_by_hand_is_never_served_as_a_result(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        for task_id, content in [
            ("cut", b'{"task_id": "cut", "status": "succ'),
            ("array", b"[1, 2]"),
            ("binary", b"\xff\xfe"),
            # another task's result copied over it: valid, but not this task's
            ("copied", b'{"task_id": "some-other-task", "status": "succeeded", "text": "x"}'),
        ]:
            (workspace.root / "results" / f"{task_id}.json").write_bytes(content)
            async with session.get(f"{base}/v1/tasks/{task_id}") as r:
                body = await r.json()
                assert r.status == 500 and body["code"] == "INTERNAL", (task_id, body)
                assert body["message"].startswith(
                    f"results/{task_id}.json is not a result the daemon wrote: "
                ), body
                assert "changed outside the daemon" in body["hint"], body
            # nor cancelled as if it were still to run: a request would wait for ever
            async with session.post(f"{base}/v1/tasks/{task_id}/cancel") as r:
                body = await r.json()
                assert r.status == 500 and body["code"] == "INTERNAL", (task_id, body)
                assert "is not a result the daemon wrote" in body["message"], body
        assert list((workspace.spool.root / "cancel").glob("*")) == []


async def test_nan_infinity_and_out_of_range_numbers_are_refused_not_written_as_null(
    workspace: Workspace, serve: Any
) -> None:
    """Python's json reads NaN, Infinity and 1e400; JSON has no such numbers, and the task
    written to the spool would say null where its sender meant them (a tool schema's
    `maximum: Infinity` turned into `maximum: null`). Each is a 400 naming it."""
    base = _url(await serve())
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for word, said in [
            ("NaN", "NaN is not a JSON number"),
            ("Infinity", "Infinity is not a JSON number"),
            ("-Infinity", "-Infinity is not a JSON number"),
            ("1e400", "1e400 is beyond the range of a number"),
            ("1e-400", "1e-400 is too small to be told from 0"),  # it would be sent as 0
        ]:
            body = (
                '{"task_id": "n1", "model": "m1", "prompt": "hi", "max_tokens": 2, '
                '"labels": {"a": "b"}, "sampling": {"temperature": ' + word + "}}"
            )
            async with session.post(f"{base}/v1/tasks", data=body, headers=headers) as r:
                answer = await r.json()
                assert r.status == 400 and answer["code"] == "INVALID_PARAMS", (word, answer)
                assert said in answer["message"], answer
                assert answer["hint"] == "write a finite number, or null", answer
    assert workspace.result("n1") is None


async def test_cancels_of_one_task_at_once_all_answer_and_it_ends_canceled(
    workspace: Workspace, serve: Any
) -> None:
    base = await _serve_slow(workspace, serve)
    async with aiohttp.ClientSession() as session:
        await _post_until_running(session, base, workspace, "cc", max_tokens=400)

        async def cancel() -> int:
            async with session.post(f"{base}/v1/tasks/cc/cancel") as response:
                return response.status

        statuses = await asyncio.gather(*(cancel() for _ in range(10)))
        assert set(statuses) <= {200, 202}, statuses
        assert (await wait_terminal(workspace, "cc"))["status"] == "canceled"


async def test_a_stream_resumed_at_or_past_its_terminal_frame_answers_204(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("done1", max_tokens=3)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "done1")
        last = workspace.frames("done1")[-1].id
        for after in (last, last + 1, 999_999):
            url = f"{base}/v1/tasks/done1/events"
            timeout = aiohttp.ClientTimeout(total=5)
            async with session.get(
                url, headers={"Last-Event-ID": str(after)}, timeout=timeout
            ) as response:
                assert response.status == 204  # an EventSource stops reconnecting
                assert await response.read() == b""
            async with session.head(url, headers={"Last-Event-ID": str(after)}) as response:
                assert response.status == 204  # HEAD answers as GET would
        # one before the end still gets the end
        frames = await _frames(session, url, **{"Last-Event-ID": str(last - 1)})
        assert [int(f["id"]) for f in frames] == [last] and frames[0]["event"] == "end"


async def test_a_body_past_a_task_files_bounds_is_a_400_naming_it_never_a_500_or_a_202(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)

    def schema(inner: Any, task_id: str) -> bytes:
        # a chat task's response_format takes any JSON schema: the place for deep values
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": inner}}
        body = task(task_id, response_format=fmt, messages=[{"role": "user", "content": "hi"}])
        del body["prompt"]
        return json.dumps(body).encode()

    def nested(levels: int) -> dict[str, Any]:
        inner: dict[str, Any] = {"type": "string"}
        for _ in range(levels):
            inner = {"type": "object", "properties": {"x": inner}}
        return inner

    bodies: list[tuple[bytes, str]] = [
        (schema(nested(20), "b1"), "levels deep"),
        (schema(nested(400), "b2"), "levels deep"),
        (schema({"enum": list(range(20_000))}, "b3"), "values"),
        (schema(nested(5), "b4"), ""),  # within the bounds: accepted, and it runs
        (b'{"model": "m1", "prompt": "hi", "max_tokens": ' + b"9" * 4301 + b"}", "max_tokens"),
        (b'{"model": "m1", "prompt": "hi", "max_tokens": 4, "max_tokens": 9}', "max_tokens"),
        (b'{"model": "m1", "prompt": "hi", "labels": {"\\ud800": "x"}}', "surrogate"),
    ]
    async with aiohttp.ClientSession() as session:
        for raw, text in bodies:
            async with session.post(
                f"{base}/v1/tasks", data=raw, headers={"Content-Type": "application/json"}
            ) as response:
                body = await response.json()
                if not text:
                    assert response.status == 202, body
                    continue
                assert response.status == 400, (raw[:80], body)
                assert body["code"] == "INVALID_PARAMS" and text in body["message"], body
        async with session.get(f"{base}/v1/artifacts?limit={'9' * 4301}") as response:
            assert response.status == 400
        async with session.post(
            f"{base}/v1/artifacts", json={"kind": "plan", "content": {"\ud800": 1}}
        ) as response:
            body = await response.json()
            assert response.status == 400 and "surrogate" in body["message"], body
    assert list(workspace.spool.failed.iterdir()) == []  # nothing was delivered to fail
    assert (await wait_terminal(workspace, "b4"))["status"] == "succeeded"


async def test_a_null_task_id_is_made_up_as_an_absent_one_is(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(f"{base}/v1/tasks", json=task(None)) as response:
                body = await response.json()
                assert response.status == 202, body
                assert body["task_id"].startswith("t-") and body["task_id"] != "None"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The daemon's log as `orchctl serve` sets it up (JSON lines), into a string."""
    loggers = [logging.getLogger(n) for n in (*logs.CONFIGURED, "aiohttp.server")]
    saved = [(list(lg.handlers), list(lg.filters), lg.level, lg.propagate) for lg in loggers]
    stream = io.StringIO()
    logs.setup(fmt="json", stream=stream)
    yield stream
    for lg, (handlers, filters, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.filters[:], lg.level, lg.propagate = handlers, filters, level, propagate


async def test_a_client_that_leaves_or_sends_malformed_http_is_one_plain_log_line_not_an_error(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    _running, base = await _slow_daemon(workspace, serve, tokens_per_s=200)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/tasks", json=task("gone", max_tokens=300)) as r,
    ):
        assert r.status == 202
    for _ in range(3):  # a stream read for a moment, then its socket dropped
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /v1/tasks/gone/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        await reader.read(200)
        writer.transport.abort()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    await writer.drain()
    answer = await reader.read(4096)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400"
    await wait_terminal(workspace, "gone")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert not [x for x in lines if x["event"] == "http.internal"], lines
    malformed = [x for x in lines if x["event"] == "http.malformed_request"]
    assert len(malformed) == 1 and malformed[0]["level"] == "warning"
    assert "exception" not in malformed[0] and "Traceback" not in json_log.getvalue()


async def test_a_live_task_whose_result_file_is_gone_is_still_answered(
    workspace: Workspace, serve: Any
) -> None:
    """Its result file deleted by hand while it runs: GET answers what the daemon holds of
    it, not 404 (POSTing its id again is refused as a duplicate all the while)."""
    _running, base = await _slow_daemon(workspace, serve, tokens_per_s=20)
    workspace.submit("gone.task.yaml", task("gone", max_tokens=40))
    await wait_for(lambda: (workspace.result("gone") or {}).get("status") == "running", 10, "run")
    (workspace.root / "results" / "gone.json").unlink()
    async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/tasks/gone") as r:
        assert r.status == 200
        body = await r.json()
    assert (body["task_id"], body["status"]) == ("gone", "running")


async def test_a_session_task_recovered_after_a_restart_keeps_the_budgets_it_was_accepted_with(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0] |= {"slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0.0}}
    cfg["sessions"] = {"ttl_s": 600, "max_turns": 8}
    workspace.write_config(cfg)
    running = await serve()
    workspace.submit("busy.task.yaml", task("busy", max_tokens=60))
    await wait_for(lambda: (workspace.result("busy") or {}).get("status") == "running", 10)
    workspace.submit("s1.task.yaml", task("s1", max_tokens=2) | {"session_id": "chat-a"})
    await wait_for(lambda: (workspace.result("s1") or {}).get("status") == "queued", 10)
    accepted = workspace.result("s1")["budgets"]
    assert accepted["session_id"] == "chat-a" and accepted["turns_remaining"] == 7, accepted
    await running.stop()  # s1 is left queued, resumable
    await asyncio.sleep(1.2)  # the session's TTL runs down meanwhile
    await serve()
    finished = await wait_terminal(workspace, "s1", 20)
    assert finished["status"] == "succeeded", finished
    assert finished["budgets"] == accepted  # as at its acceptance, not recomputed
    queued = [f for f in workspace.frames("s1") if f.event == "queued"]
    assert queued and all(f.data["budgets"] == accepted for f in queued), queued


async def test_refusals_say_what_to_send_not_a_generic_hint(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    generic = "Fix the named field and submit again."
    async with aiohttp.ClientSession() as session:
        async with session.put(f"{base}/v1/tasks") as r:
            body = await r.json()
            assert r.status == 405 and r.headers["Allow"] == "POST", body
            assert body["message"] == "PUT is not allowed on /v1/tasks", body
            assert body["hint"].startswith("use POST"), body
        async with session.get(f"{base}/v1/tasks/a..b") as r:
            body = await r.json()
            assert r.status == 400 and "task ids are 1 to 128" in body["hint"], body
        async with session.get(f"{base}/v1/tasks/x/events?last_event_id=-1") as r:
            body = await r.json()
            assert r.status == 400 and "id of the last event received" in body["hint"], body
            assert body["message"] == "?last_event_id must be 0 or more", body
        for given, said in (("%203", "' 3' is not an event id"), ("", "is empty")):
            # a query value is taken as given (only a header's has spaces HTTP strips)
            async with session.get(f"{base}/v1/tasks/x/events?last_event_id={given}") as r:
                body = await r.json()
                assert r.status == 400 and said in body["message"], body
        async with session.get(
            f"{base}/v1/tasks/x/events?last_event_id=1x", headers={"Last-Event-ID": "5"}
        ) as r:  # the header wins, but a query that is no id is still refused
            body = await r.json()
            assert r.status == 400 and "'1x' is not an event id" in body["message"], body
        async with session.post(f"{base}/v1/tasks", json=[1]) as r:
            body = await r.json()
            assert r.status == 400 and '"max_tokens": 64' in body["hint"], body
        async with session.post(f"{base}/v1/pools/p1/drain", json=[1]) as r:
            body = await r.json()
            assert r.status == 400 and body["hint"] != generic, body
        async with session.post(f"{base}/v1/chat/completions", json={"model": "m1"}) as r:
            body = (await r.json())["error"]
            assert r.status == 400 and body["param"] == "messages", body
            assert '"role": "user"' in body["hint"], body
        async with session.post(
            f"{base}/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "x"}], "n": 2},
        ) as r:
            body = (await r.json())["error"]
            assert r.status == 400 and body["hint"] == "send n: 1, or leave it out", body
        async with session.get(f"{base}/v1/sessions/never-used") as r:
            body = await r.json()
            assert r.status == 404 and "once a task names it" in body["hint"], body
        latin1 = {"Content-Type": "application/json"}
        for path in ("/v1/tasks", "/v1/pools/p1/drain", "/v1/chat/completions"):
            async with session.post(f"{base}{path}", data=b'{"a": "\xff"}', headers=latin1) as r:
                body = await r.json()
                body = body.get("error", body)
                assert r.status == 400 and "UTF-8" in body["hint"], (path, body)
        for method, path in (
            ("GET", "/v1/catalog/models/a..b"),
            ("POST", "/v1/catalog/models/a..b/verify"),
            ("POST", "/v1/pools/a..b/drain"),
            ("POST", "/v1/pools/a%20b/reload"),
        ):
            async with session.request(method, f"{base}{path}") as r:
                body = await r.json()
                assert r.status == 400 and "ids are 1 to 128" in body["hint"], (path, body)
        # a field's name is the client's text: shown abridged, not echoed whole three times
        huge = {"model": "m1", "prompt": "x", "max_tokens": 2, "k" * 200_000: 1}
        for body_sent in (huge, {"model": "m" * 100_000, "prompt": "x"}):
            async with session.post(f"{base}/v1/completions", json=body_sent) as r:
                answer = await r.read()
                assert r.status in (400, 404) and len(answer) < 2000, (r.status, len(answer))


async def test_a_cancel_request_dropped_is_always_said_in_the_log(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    await serve()
    workspace.submit("done1.task.yaml", task("done1", max_tokens=2))
    await wait_terminal(workspace, "done1")
    cancels = workspace.spool.root / "cancel"
    (cancels / "with space").write_text("")
    (cancels / "done1").write_text("")
    await wait_for(lambda: not any(cancels.iterdir()), 10, "both requests consumed")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    dropped = [r["human"] for r in lines if r["event"] == "task.cancel_dropped"]
    assert any("spool/cancel/with space: its name is not a task id" in h for h in dropped), dropped
    assert any("done1: it already ended (succeeded)" in h for h in dropped), dropped


async def test_a_folder_or_link_in_the_cancel_folder_is_said_ignored_once_and_left(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    await serve()
    cancels = workspace.spool.root / "cancel"
    (cancels / "afolder").mkdir()
    (cancels / "alink").symlink_to(workspace.root / "nowhere")
    workspace.submit("after.task.yaml", task("after", max_tokens=2))
    await wait_terminal(workspace, "after")  # passes ran meanwhile
    await asyncio.sleep(0.5)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    said = sorted(r["human"].split(":")[0] for r in lines if r["event"] == "task.cancel_ignored")
    assert said == ["Ignoring spool/cancel/afolder", "Ignoring spool/cancel/alink"], said
    assert sorted(p.name for p in cancels.iterdir()) == ["afolder", "alink"]


async def test_a_post_the_disk_cannot_take_is_a_retriable_503_and_nothing_is_delivered(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk under spool/tmp was a 500 INTERNAL ("a bug") with a part file left."""
    base = _url(await serve())
    tmp = workspace.root / "spool" / "tmp"
    full_disk_under(tmp, monkeypatch)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("full1")) as r:
            body = await r.json()
            assert (r.status, body["code"], body["retriable"]) == (503, "SPOOL_UNWRITABLE", True)
            assert "No space left on device" in body["message"] and r.headers["Retry-After"]
        assert list(tmp.iterdir()) == [] and workspace.result("full1") is None
        monkeypatch.undo()  # room again: the same task is taken
        async with session.post(f"{base}/v1/tasks", json=task("full1")) as r:
            assert r.status == 202, await r.json()
    assert (await wait_terminal(workspace, "full1"))["status"] == "succeeded"


async def test_a_stream_whose_client_left_before_it_began_is_one_client_gone_line_not_a_500(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    """Seen with a daemon held up (SIGSTOP): clients that gave up meanwhile had their
    requests read once it went on, and aiohttp_sse asserted a transport: http.internal."""
    running = await serve()
    base = _url(running).rstrip("/")
    workspace.submit("s1.task.yaml", task("s1", max_tokens=2))
    await wait_terminal(workspace, "s1")
    books = running.daemon.books
    real = books.settled

    async def held_up(task_id: str | None = None) -> None:
        await asyncio.sleep(0.5)  # the client leaves meanwhile
        await real(task_id)

    books.settled = held_up  # type: ignore[method-assign]
    host, port = base.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/tasks/s1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    writer.transport.abort()
    await asyncio.sleep(1.0)
    books.settled = real  # type: ignore[method-assign]
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert not [x for x in lines if x["event"] == "http.internal"], lines
    assert [x["event"] for x in lines if x["event"] == "http.client_gone"] == ["http.client_gone"]


async def test_a_stopping_daemon_ends_open_streams_in_their_own_words(
    workspace: Workspace, serve: Any, json_log: io.StringIO
) -> None:
    """Streams still open when the daemon stops (their tasks queued behind a busy slot) end
    whole, saying why, instead of being cut mid-chunk: an OpenAI stream gets an error chunk
    with DAEMON_STOPPING, a waiting non-streaming request a 503 in OpenAI's shape, a task's
    event stream a last comment (it resumes after the restart); and the log does not say
    the clients left."""
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    base = _url(running)
    chat = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with aiohttp.ClientSession() as session:
        for task_id in ("busy", "waiting"):
            async with session.post(f"{base}/v1/tasks", json=task(task_id, max_tokens=400)) as r:
                assert r.status == 202
        await wait_for(lambda: (workspace.result("busy") or {}).get("status") == "running", 10)
        streamed = await session.post(f"{base}/v1/chat/completions", json=chat | {"stream": True})
        assert streamed.status == 200
        whole = asyncio.create_task(session.post(f"{base}/v1/chat/completions", json=chat))
        events_stream = await session.get(f"{base}/v1/tasks/waiting/events")
        assert events_stream.status == 200
        await asyncio.sleep(0.5)
        running.daemon.stop()
        running.daemon.stop()  # at once: the running task is left resumable
        stream_body = (await asyncio.wait_for(streamed.read(), 10)).decode()
        events_body = (await asyncio.wait_for(events_stream.read(), 10)).decode()
        answer = await asyncio.wait_for(whole, 10)
        body = await answer.json()
        assert answer.status == 503 and body["error"]["code"] == "DAEMON_STOPPING", body
    assert await asyncio.wait_for(running.job, 20) == 0
    last = [line for line in stream_body.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "DAEMON_STOPPING", last
    last_words = ": the daemon is stopping; reconnect with Last-Event-ID to resume\n\n"
    assert events_body.endswith(last_words), events_body
    assert (workspace.result("waiting") or {}).get("status") == "queued"  # resumes at restart
    # the OpenAI requests were told their tasks are canceled: so they are, on disk, now
    chats = [p for p in workspace.results.root.glob("chatcmpl-*.json")]
    assert len(chats) == 2 and all(json.loads(p.read_text())["status"] == "canceled" for p in chats)
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    events_seen = [x["event"] for x in lines]
    assert events_seen.count("http.answer_stopped") == 2, events_seen
    assert "http.client_gone" not in events_seen and "http.internal" not in events_seen
    # the second stop says so, and what it leaves
    [hurried] = [x for x in lines if x["event"] == "daemon.hurried"]
    assert hurried["running"] >= 1 and "left resumable" in hurried["human"], hurried


async def test_a_cancel_sent_while_the_daemon_drains_is_carried_out(
    workspace: Workspace, serve: Any
) -> None:
    """A stop waits for running tasks (the drain); a cancel sent meanwhile, often to let the
    stop end sooner, cancels its task (it was acknowledged, 202, and then ignored: the task
    ran to its end and the daemon waited the whole drain)."""
    cfg = config(timeouts={"ready_s": 10, "drain_s": 30, "stop_grace_s": 2})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    base = _url(running)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("long", max_tokens=600)) as r:
            assert r.status == 202
        await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
        running.daemon.stop()  # the drain: up to 30 s for the 30 s task
        await asyncio.sleep(0.3)
        # status says the daemon stops, and a task submitted now is not waited for in vain
        assert workspace.status()["daemon"]["stopping_since"], workspace.status()["daemon"]
        conf = ("--config", workspace.config_path)
        shown = await asyncio.to_thread(orchctl, "status", *conf)
        assert "STOPPING since" in shown.out, shown.out
        late = workspace.root / "late.task.yaml"
        late.write_text(json.dumps(task("late", max_tokens=2)))
        t0 = time.monotonic()
        ran = await asyncio.to_thread(orchctl, "submit", late, "--wait", *conf)
        assert ran.code == 3 and "is stopping: the task will run at its next start" in ran.err
        assert time.monotonic() - t0 < 5
        # canceled while it still waits in incoming/: carried out now, not at the next start
        gone = await asyncio.to_thread(orchctl, "cancel", "late", *conf)
        assert gone.code == 0, gone.err
        await wait_for(lambda: (workspace.result("late") or {}).get("status") == "canceled", 3)
        assert not any(workspace.spool.incoming.iterdir())
        # over HTTP too, by the id a file waiting under another name gives its task
        workspace.submit("named-otherwise.task.yaml", task("late2", max_tokens=2))
        async with session.get(f"{base}/v1/tasks/late2") as r:
            assert (r.status, (await r.json())["status"]) == (200, "delivered")
        async with session.post(f"{base}/v1/tasks/named-otherwise/cancel") as r:
            assert r.status == 404, await r.text()  # a file name is no task id
        async with session.post(f"{base}/v1/tasks/late2/cancel") as r:
            assert r.status == 202, await r.text()
        await wait_for(lambda: (workspace.result("late2") or {}).get("status") == "canceled", 3)
        async with session.post(f"{base}/v1/tasks/long/cancel") as r:
            assert r.status in (200, 202), await r.text()
    t0 = time.monotonic()
    assert await asyncio.wait_for(running.job, 10) == 0
    assert time.monotonic() - t0 < 5
    ended = workspace.result("long") or {}
    assert ended.get("status") == "canceled", ended
    assert not any(workspace.spool.cancel.iterdir())  # the request consumed, not left over


async def test_a_queued_task_is_not_watched_in_vain_while_the_daemon_drains(
    workspace: Workspace, serve: Any
) -> None:
    """While the daemon drains, a queued task will not move until its next start: its event
    stream ends with the daemon's last words, and `orchctl watch` says so and exits 3 at
    once (it waited for the whole drain, then about 5 s more reconnecting)."""
    cfg = config(timeouts={"ready_s": 10, "drain_s": 30, "stop_grace_s": 2})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    base = _url(running)
    conf = ("--config", workspace.config_path)
    async with aiohttp.ClientSession() as session:
        for name, tokens in (("long", 600), ("waits", 2)):
            async with session.post(f"{base}/v1/tasks", json=task(name, max_tokens=tokens)) as r:
                assert r.status == 202
        await wait_for(lambda: (workspace.result("long") or {}).get("status") == "running", 10)
        running.daemon.stop()  # the drain: up to 30 s for the 30 s task
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        async with session.get(f"{base}/v1/tasks/waits/events") as stream:
            body = await asyncio.wait_for(stream.text(), 5)
        assert body.endswith(": the daemon is stopping; reconnect with Last-Event-ID to resume\n\n")
        assert "event: queued" in body
        watched = await asyncio.to_thread(orchctl, "watch", "waits", *conf)
        assert watched.code == 3, watched.err
        assert "is stopping: task waits is queued and will run at its next start" in watched.err
        assert time.monotonic() - t0 < 5
        async with session.post(f"{base}/v1/tasks/long/cancel") as r:
            assert r.status in (200, 202)
    assert await asyncio.wait_for(running.job, 10) == 0


async def test_a_stream_opened_as_its_task_is_rejected_gets_the_rejection(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit --wait` hung for ever, now and then, on a task rejected as it was taken: the
    stream looked for the result, the daemon rejected the task and published its one frame
    to no reader yet, and the reader then found the log not yet on disk (its commit still
    pending) and waited for live frames that had already gone by."""
    import threading

    from state import atomic, results

    running = await serve()
    base = _url(running)
    real_read, real_commit = results.ResultStore.read, atomic.commit

    def late_read(self: Any, task_id: str) -> Any:
        if threading.current_thread() is not threading.main_thread():  # the route's look
            time.sleep(0.3)  # the daemon takes and rejects the task meanwhile
        return real_read(self, task_id)

    def slow_commit(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.8)  # its frame reaches the log after the reader looked there
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(results.ResultStore, "read", late_read)
    monkeypatch.setattr(atomic, "commit", slow_commit)
    workspace.submit("nope.task.yaml", task("nope", model="no-such-model"))
    async with aiohttp.ClientSession() as session:
        frames = await asyncio.wait_for(_frames(session, f"{base}/v1/tasks/nope/events"), 10)
    assert [f["event"] for f in frames] == ["error"], frames
    assert frames[0]["data"]["code"] == "MODEL_UNKNOWN"


async def test_a_correlation_id_in_the_body_is_used_or_refused_never_replaced_unsaid(
    workspace: Workspace, serve: Any
) -> None:
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        body = task("c1", max_tokens=2) | {"correlation_id": "body-1"}
        async with session.post(f"{base}/v1/tasks", json=body) as r:
            assert r.status == 202, await r.text()
            assert r.headers["X-Correlation-Id"] == "body-1"
        refused = [
            (
                {"correlation_id": "body-2"},
                {"X-Correlation-Id": "hdr-2"},
                "X-Correlation-Id another",
            ),
            ({"correlation_id": "bad id\nx"}, {}, "correlation_id: 1 to 128"),
        ]
        for extra, headers, said in refused:
            body = task("c2", max_tokens=2) | extra
            async with session.post(f"{base}/v1/tasks", json=body, headers=headers) as r:
                answer = await r.json()
                assert r.status == 400 and said in answer["message"], answer
    assert (await wait_terminal(workspace, "c1")).get("status") == "succeeded"
    assert workspace.result("c2") is None


@pytest.mark.parametrize("how", ["removed", "cut"])
async def test_a_stream_of_a_task_whose_log_was_changed_while_it_ran_still_ends(
    workspace: Workspace, serve: Any, how: str
) -> None:
    """The log removed (or replaced by a cut copy) while its task ran: the frames handed
    over live could not be matched with it, and the stream sent keep-alives for ever after
    the task had ended. It ends once the task has, saying its log lacks frames."""
    base = await _serve_slow(workspace, serve)
    async with aiohttp.ClientSession() as session:
        await _post_until_running(session, base, workspace, "hurt", max_tokens=30)
        log_path = workspace.results.events_path("hurt")
        first_line = log_path.read_bytes().splitlines(keepends=True)[0]
        log_path.unlink()
        if how == "cut":
            log_path.write_bytes(first_line)
        async with session.get(f"{base}/v1/tasks/hurt/events") as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.text(), 10)
    assert (workspace.result("hurt") or {}).get("status") == "succeeded"
    assert body.rstrip().endswith("GET /v1/tasks/hurt for its result"), body[-300:]
    assert ": the event log lacks frames the task wrote" in body


async def test_hand_changes_to_a_finished_tasks_files_are_answered_as_they_are(
    workspace: Workspace, serve: Any
) -> None:
    """A result removed with its log left: a cancel said cancel-requested and left a request
    behind (the task had ended: its log says so). A folder where the result goes: GET said
    there was no such task. A file in incoming/ that intake will refuse for its name: it was
    shown as delivered and a cancel of it was taken."""
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/tasks", json=task("done", max_tokens=2)) as r:
            assert r.status == 202
        await wait_terminal(workspace, "done")
        workspace.results.path("done").unlink()
        async with session.post(f"{base}/v1/tasks/done/cancel") as r:
            assert (r.status, await r.json()) == (200, {"task_id": "done", "status": "succeeded"})
        assert list(workspace.spool.cancel.iterdir()) == []
        workspace.results.path("folder").mkdir()
        async with session.get(f"{base}/v1/tasks/folder") as r:
            body = await r.json()
            assert r.status == 500 and "results/folder.json is not a result" in body["message"]
    # named so that intake refuses it: never delivered as a task (the daemon is stopped
    # first, so it stays in incoming/ to be looked at)
    (workspace.spool.incoming / "weird-name.json").write_text(json.dumps(task("weird-name")))
    from state import pending

    assert pending.task_id_of(workspace.spool.incoming / "weird-name.json") is None


async def test_a_session_deleted_mid_turn_leaves_its_turn_to_itself_not_its_successor(
    workspace: Workspace, serve: Any
) -> None:
    """DELETE /v1/sessions/{id} while a turn of it runs: the session is gone with its
    turns; a new session of that id starts from nothing, is neither charged the old turn's
    tokens when it ends nor refused for them while it runs."""
    cfg = config(sessions={"ttl_s": 600, "max_turns": 8, "token_budget": 60})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        old = task("old-turn", session_id="agent", max_tokens=40)
        async with session.post(f"{base}/v1/tasks", json=old) as r:
            assert r.status == 202, await r.text()
        await wait_for(lambda: (workspace.result("old-turn") or {}).get("status") == "running")
        async with session.delete(f"{base}/v1/sessions/agent") as response:
            assert response.status == 204
        new = task("new-turn", session_id="agent", max_tokens=50)  # 40 + 50 > 60 if charged
        async with session.post(f"{base}/v1/tasks", json=new) as r:
            answer = await r.json()
            assert r.status == 202, answer
        assert answer["budgets"]["tokens_budget_remaining"] == 60 - 50, answer
        await wait_terminal(workspace, "old-turn", timeout=15)
        await wait_terminal(workspace, "new-turn", timeout=15)
        async with session.get(f"{base}/v1/sessions/agent") as response:
            info = await response.json()
    assert info["turns"] == 1 and info["tokens_out"] == 50, info


async def test_a_session_in_use_shows_its_whole_ttl_not_a_run_down_one(
    workspace: Workspace, serve: Any
) -> None:
    """A session does not expire while a turn of it is queued or running, and a new turn
    sent then is accepted: GET /v1/sessions/{id} says so (it showed 0 ms left, as if the
    session were expiring, to a client that checks before sending)."""
    cfg = config(sessions={"ttl_s": 1, "max_turns": 8})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 10, "load_s": 0.0}
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:
        long = task("long-turn", session_id="busy", max_tokens=30)
        async with session.post(f"{base}/v1/tasks", json=long) as r:
            assert r.status == 202, await r.text()
        await wait_for(lambda: (workspace.result("long-turn") or {}).get("status") == "running")
        await asyncio.sleep(1.3)  # past ttl_s since the turn began
        async with session.get(f"{base}/v1/sessions/busy") as response:
            info = await response.json()
        assert info["ttl_ms_remaining"] == 1000, info
        async with session.post(f"{base}/v1/tasks/long-turn/cancel") as response:
            assert response.status in (200, 202)


def test_the_pretty_log_shows_the_daemons_own_lines_as_lines() -> None:
    """A fix with commands to copy (no driver: pacman, apt) was one line with literal \\n;
    the daemon's own text in lines is shown in lines, indented under its record, each
    still escaped."""
    record = logging.LogRecord(
        "llama_orch.daemon", 40, "", 0, "No NVIDIA driver.\n\n  sudo pacman -S x\x1b", (), None
    )
    record.orch_lines = True
    text = logs.PrettyFormatter(color=False).format(record)
    first, blank, command = text.split("\n")
    assert first.endswith("ERRO No NVIDIA driver.") and not blank.strip()
    assert command == logs.CONTINUED + "  sudo pacman -S x\\x1b"
