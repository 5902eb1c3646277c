"""The status page (HME-050): `GET /` serves one self-contained HTML page, and
`GET /v1/status/events` feeds it over SSE. `api.make_app` adds both routes.

The page (status_page.html beside this module: inline CSS and JS, no external asset, no
build step) shows the GPUs, the pools and their replicas, the queue and the recent tasks,
each live one with a cancel button that POSTs `/v1/tasks/{id}/cancel`. It builds its DOM
with `textContent` only, and is served under a Content-Security-Policy that lets only its
own inline script and style run (a per-response nonce), so a task id or an error message
can never become markup or code.

The event stream polls `Backend.status()` and the results folder every `POLL_S` (one poll for
all open pages, `Feed`) and sends `event: status` with `{status, tasks}` whenever that
changes, keep-alive comments between; the loop is never asked for anything it does not
already keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from reconciler import api
from reconciler.api import BACKEND
from state import results

POLL_S = 0.5  # how often the event stream looks for a change
RETRY_MS = 2000  # the SSE `retry:` a browser waits before reconnecting
RECENT_TASKS = 20  # how many tasks the page lists
TAIL_BYTES = 8192  # how much of a live task's event log is read for its progress
LIVE = frozenset({"queued", "running"})


def add_routes(app: web.Application) -> None:
    api.takes_query(app, app.router.add_get("/", page), any_names=True)  # a page for people
    app.router.add_get("/v1/status/events", status_events)
    app[FEED] = Feed(app[BACKEND])


async def page(request: web.Request) -> web.StreamResponse:
    html = await asyncio.to_thread(_page_source)
    nonce = secrets.token_urlsafe(18)
    html = html.replace("<script>", f'<script nonce="{nonce}">').replace(
        "<style>", f'<style nonce="{nonce}">'
    )
    response = web.Response(text=html, content_type="text/html", charset="utf-8")
    response.headers.update(
        {
            "Content-Security-Policy": (
                f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                "frame-ancestors 'none'"
            ),
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",  # the cancel buttons must not be clickable in a frame
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        }
    )
    return response


def _page_source() -> str:
    return resources.files("reconciler").joinpath("status_page.html").read_text("utf-8")


async def status_events(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    headers = {
        "X-Correlation-Id": request[api.CORRELATION],
        "X-Accel-Buffering": "no",
        "Cache-Control": "no-cache",
    }
    if request.method == "HEAD":
        return api.stream_head(headers)
    feed = request.app[FEED]
    feed.readers += 1
    feed.start()
    try:
        async with api.event_stream(request, headers) as stream:
            seen = 0  # the feed's version this page has
            while stream.is_connected() and not api.client_gone(request):
                if backend.closing.is_set():
                    break
                if feed.version > seen and feed.text is not None:
                    retry = RETRY_MS if seen == 0 else None
                    seen = feed.version
                    try:
                        await stream.send(feed.text, event="status", retry=retry)
                    except ConnectionResetError:
                        break  # the page was closed
                    continue
                await feed.changed_after(seen, api.WATCH_S)
            return stream
    finally:
        feed.readers -= 1


class Feed:
    """What every open status page is sent, made once for all of them: `Backend.status()`
    and the recent tasks, polled every POLL_S while a page is open (each page polling on
    its own cost ~1.5 % of a core: 200 open pages took the daemon to 94 %). `version` grows
    at each change of `text`."""

    def __init__(self, backend: api.Backend) -> None:
        self.backend = backend
        self.recent = RecentTasks(backend.results)
        self.text: str | None = None
        self.version = 0
        self.readers = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def changed_after(self, version: int, timeout_s: float) -> None:
        """Return once `version` is not the latest, or after `timeout_s`."""
        if self.version > version:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def _poll(self) -> None:
        while self.readers > 0:
            tasks = await asyncio.to_thread(self.recent.rows)
            status = self.backend.status().model_dump(mode="json")
            text = json.dumps({"status": status, "tasks": tasks}, ensure_ascii=False)
            if text != self.text:
                self.text, self.version = text, self.version + 1
                self._changed.set()
                self._changed = asyncio.Event()
            await asyncio.sleep(POLL_S)


FEED: web.AppKey[Feed] = web.AppKey("status_feed", Feed)


class RecentTasks:
    """The newest `limit` results as the page's rows. The folder is listed once; after that
    only the results the daemon wrote since the last look are read again (the store keeps
    their ids: `ResultStore.written_since`), with the rows shown, so a page open while
    results/ holds many thousands costs what one with twenty does (listing and stat-ing
    10,000 results took 75 ms, every poll). A live task's tokens and on-time probability
    come from the tail of its event log, since its result file changes only at transitions."""

    def __init__(self, store: results.ResultStore, limit: int = RECENT_TASKS) -> None:
        self.store = store
        self.limit = limit
        self._seen_writes: int | None = None
        self._ids: list[str] = []  # the rows' ids, the most recently written last
        self._rows: list[dict[str, Any]] = []
        self._unsettled = False  # a row live, or an id not readable yet: read again

    def rows(self) -> list[dict[str, Any]]:
        writes = self.store.writes
        seen = self._seen_writes
        fresh = self.store.written_since(seen) if seen is not None else None
        if fresh is None:  # the first look, or more written since than the store keeps
            self._rows = recent_tasks(self.store, self.limit)
            self._ids = [row["task_id"] for row in reversed(self._rows)]
        elif fresh or self._unsettled:
            # a result written in a commit still pending reads as before (or not at all):
            # read again while a row is live or missing, so its write is seen once it lands
            ids = [i for i in self._ids if i not in fresh] + fresh
            self._ids = ids[-self.limit :]
            found = [self.store.read(task_id) for task_id in self._ids]
            rows = [task_row(result) for result in found if result is not None]
            rows.sort(key=lambda row: (row["accepted_at"] or "", row["task_id"]), reverse=True)
            self._rows = rows
        self._unsettled = len(self._rows) < len(self._ids) or any(r["live"] for r in self._rows)
        self._seen_writes = writes
        return [
            row | progress(self.store.events_path(row["task_id"])) if row["live"] else row
            for row in self._rows
        ]


def progress(events_path: Path) -> dict[str, Any]:
    """What the last frames of a live task's event log say: tokens so far (the last `token`
    frame's index + 1) and the latest on-time probability (the last `metrics` frame). Reads
    only the log's tail; {} when the tail has neither."""
    try:
        with events_path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return {}
    lines = tail.split(b"\n")[1 if size > TAIL_BYTES else 0 : -1]  # whole lines only
    found: dict[str, Any] = {}
    for line in reversed(lines):
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        data = frame.get("data") if isinstance(frame, dict) else None
        if not isinstance(data, dict):
            continue
        if frame.get("event") == "started":
            break  # frames before it belong to an earlier attempt
        if frame.get("event") == "token" and "tokens_out" not in found:
            found["tokens_out"] = int(data.get("i", -1)) + 1
        elif frame.get("event") == "metrics" and "on_time_probability" not in found:
            found["on_time_probability"] = data.get("on_time_probability")
        if len(found) == 2:
            break
    return found


def recent_tasks(store: results.ResultStore, limit: int = RECENT_TASKS) -> list[dict[str, Any]]:
    """The `limit` most recently written results, newest accepted first."""
    stamped: list[tuple[int, str]] = []
    # every *.json here is a result (error records are in spool/failed/): an id may end in
    # .error, and its task is listed like any other
    for path in store.root.glob("*.json"):
        try:
            stamped.append((path.stat().st_mtime_ns, path.name[: -len(".json")]))
        except OSError:
            continue  # finished and filed away while we listed
    rows = []
    for _, task_id in sorted(stamped, reverse=True):
        result = store.read(task_id)  # None for a file that is not a result: skipped
        if result is not None:
            rows.append(task_row(result))
            if len(rows) == limit:
                break
    rows.sort(key=lambda row: (row["accepted_at"] or "", row["task_id"]), reverse=True)
    return rows


def task_row(result: results.Result) -> dict[str, Any]:
    return {
        "task_id": result.task_id,
        "status": result.status,
        "live": result.status in LIVE,
        "model": result.model,
        "pool_id": result.pool_id,
        "replica_id": result.replica_id,
        "gpu": result.gpu.index if result.gpu is not None else None,
        "tokens_out": result.tokens_out,
        "on_time_probability": result.on_time_probability,
        "queue_position": result.queue_position,
        "accepted_at": result.timings.accepted_at,
        "finished_at": result.timings.finished_at,
        "first_token_ms": result.timings.first_token_ms,
        "error": (
            {"code": result.error.code, "message": result.error.message}
            if result.error is not None
            else None
        ),
    }
