"""The status page (HME-050): `GET /` is one self-contained document under a strict policy,
`GET /v1/status/events` sends the status and the recent tasks whenever they change, and the
recent tasks are the newest ones. The page itself, in a real browser, is in
tests/test_status_page_browser.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from reconciler import api_page
from state import events, results
from tests.conftest import Workspace, task, wait_terminal


def _url(running: Any) -> str:
    server = running.daemon.server
    assert server is not None
    return str(server.url)


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """SSE events as {event, data, retry} dicts; comments (keep-alives) skipped."""
    frame: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if frame:
                yield frame
                frame = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            frame[key] = json.loads(value) if key == "data" else value


@pytest.mark.slow
async def test_the_page_is_one_document_with_no_outside_asset_under_a_strict_policy(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    async with aiohttp.ClientSession() as session, session.get(_url(running) + "/") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        html = await response.text()
        policy = response.headers["Content-Security-Policy"]
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Correlation-Id"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy)
    assert nonce is not None and "default-src 'none'" in policy
    assert html.count(f'<script nonce="{nonce[1]}">') == 1
    assert html.count(f'<style nonce="{nonce[1]}">') == 1
    assert not re.search(r"\bsrc=|https?://|@import|url\(", html)  # nothing fetched from outside
    assert "innerHTML" not in html and "insertAdjacentHTML" not in html
    async with aiohttp.ClientSession() as session, session.get(_url(running) + "/") as response:
        assert response.headers["Content-Security-Policy"] != policy  # a nonce per answer


@pytest.mark.slow
async def test_the_status_stream_sends_each_change_of_the_status_and_the_tasks(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    seen: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(_url(running) + "/v1/status/events") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = _events(response)
        first = await asyncio.wait_for(anext(events), 5)
        assert first["event"] == "status" and first["retry"] == "2000"
        assert [g["index"] for g in first["data"]["status"]["gpus"]] == [0, 1]
        assert first["data"]["status"]["pools"][0]["id"] == "p1"
        assert first["data"]["tasks"] == []
        workspace.submit("s1.task.yaml", task("s1", max_tokens=4))
        while True:
            event = await asyncio.wait_for(anext(events), 10)
            assert "retry" not in event
            seen.append(event)
            tasks = event["data"]["tasks"]
            if tasks and tasks[0]["status"] == "succeeded":
                break
        row = seen[-1]["data"]["tasks"][0]
        assert row["task_id"] == "s1" and row["tokens_out"] == 4 and row["pool_id"] == "p1"
        assert row["live"] is False
        with pytest.raises(TimeoutError):  # nothing changes: nothing is sent
            await asyncio.wait_for(anext(events), 1.5)
    await wait_terminal(workspace, "s1")


def _result(task_id: str, accepted_at: str, status: results.StatusName) -> results.Result:
    return results.Result(
        task_id=task_id, status=status, timings=results.Timings(accepted_at=accepted_at)
    )


def test_recent_tasks_are_the_newest_results_newest_first(tmp_path: Path) -> None:
    store = results.ResultStore(tmp_path)
    for n in range(25):
        store.write(_result(f"t{n:02d}", f"2026-01-01T00:00:{n:02d}Z", "succeeded"))
        os.utime(store.path(f"t{n:02d}"), (1000 + n, 1000 + n))
    store.write(_result("live", "2026-01-01T00:01:00Z", "running"))  # written last
    (tmp_path / "live.events.jsonl").write_text("")
    (tmp_path / "junk.json").write_text("{not json")  # newer still, and not a result
    rows = api_page.recent_tasks(store, 10)
    assert [r["task_id"] for r in rows] == ["live", *(f"t{n:02d}" for n in range(24, 15, -1))]
    assert rows[0]["live"] is True and rows[1]["live"] is False


def test_the_recent_tasks_follow_new_results_without_listing_the_folder_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listed once; then only what the daemon wrote since is read (listing and stat-ing
    10,000 results took 75 ms a poll while a page was open). More writes between two looks
    than the store keeps: listed again."""
    store = results.ResultStore(tmp_path)
    for n in range(30):
        store.write(_result(f"old{n:02d}", f"2026-01-01T00:00:{n:02d}Z", "succeeded"))
    recent = api_page.RecentTasks(store, limit=5)
    assert recent.rows()[0]["task_id"] == "old29"
    listed: list[int] = []
    full = api_page.recent_tasks
    monkeypatch.setattr(api_page, "recent_tasks", lambda *a: listed.append(1) or full(*a))
    store.write(_result("a", "2026-01-01T00:01:00Z", "queued"))
    assert recent.rows()[0]["status"] == "queued"
    store.write(_result("a", "2026-01-01T00:01:00Z", "running"))
    store.write(_result("b", "2026-01-01T00:01:01Z", "queued"))
    rows = recent.rows()
    assert [(r["task_id"], r["status"]) for r in rows[:2]] == [("b", "queued"), ("a", "running")]
    assert len(rows) == 5 and listed == []  # none listed: the store said what changed
    monkeypatch.setattr(results, "WRITTEN_KEPT", 3)
    for n in range(5):
        store.write(_result(f"new{n}", f"2026-01-01T00:02:0{n}Z", "succeeded"))
    assert recent.rows()[0]["task_id"] == "new4" and listed == [1]


def test_a_live_tasks_progress_comes_from_the_tail_of_its_event_log(tmp_path: Path) -> None:
    log = events.EventLog(tmp_path / "t.events.jsonl")
    ts = "2026-01-01T00:00:00Z"
    log.append("queued", {"queue_position": 0}, ts=ts)
    assert api_page.progress(log.path) == {}
    log.append("started", {"attempt": 1}, ts=ts)
    for i in range(500):  # more than the tail that is read
        log.append("token", {"t": "x", "i": i}, ts=ts)
    log.append("started", {"attempt": 2}, ts=ts)  # a retry counts from zero again
    log.append("metrics", {"on_time_probability": 0.75, "tokens_out": 0}, ts=ts)
    for i in range(3):
        log.append("token", {"t": "y", "i": i}, ts=ts)
    assert log.path.stat().st_size > api_page.TAIL_BYTES
    assert api_page.progress(log.path) == {"tokens_out": 3, "on_time_probability": 0.75}
    assert api_page.progress(tmp_path / "absent.events.jsonl") == {}


async def test_open_pages_share_one_poll_of_the_status(workspace: Workspace, serve: Any) -> None:
    """Each open page polling on its own cost about 1.5 % of a core (200 pages took the
    daemon to 94 %): thirty pages now cost what one does, and each still gets the status
    and its changes."""
    from reconciler import api

    running = await serve()
    backend = running.daemon.server.runner.app[api.BACKEND]
    calls = 0
    status = backend.status

    def counted() -> Any:
        nonlocal calls
        calls += 1
        return status()

    object.__setattr__(backend, "status", counted)
    url = f"{_url(running)}/v1/status/events"
    async with aiohttp.ClientSession() as session:
        pages = [await session.get(url) for _ in range(30)]
        firsts = [await anext(_events(page)) for page in pages]
        assert all(f["event"] == "status" for f in firsts)
        calls = 0
        await asyncio.sleep(2.0)
        polls = calls
        workspace.submit("seen.task.yaml", task("seen", max_tokens=2))
        await wait_terminal(workspace, "seen")
        for page in pages:  # every page hears of the new task
            async for event in _events(page):
                if "seen" in json.dumps(event["data"]):
                    break
        for page in pages:
            page.close()
    assert polls <= 2.0 / api_page.POLL_S + 2, polls  # one poll per POLL_S, not thirty


def test_a_task_whose_id_ends_in_error_is_listed_like_any_other(tmp_path: Path) -> None:
    """results/ holds no error records (those are in spool/failed/): a result named
    z.error.json is task z.error's, shown on the page and by `orchctl tasks`."""
    store = results.ResultStore(tmp_path)
    store.write(results.Result(task_id="z.error", status="succeeded", tokens_out=2))
    store.write(results.Result(task_id="plain", status="queued"))
    assert sorted(row["task_id"] for row in api_page.recent_tasks(store)) == ["plain", "z.error"]
    assert store.task_ids() == ["plain", "z.error"]
