"""The data plane of the HTTP face: tasks, their events over SSE, cancel, sessions, and what
the daemon offers (capabilities, status, pools). `api.make_app` adds these routes.

POST /v1/tasks delivers the task into the spool (durable before anything is answered) and
waits for the loop's admission, so the answer is the `queued` frame's numbers or the
rejection's envelope. GET /v1/tasks/{id}/events relays the event log as SSE: frames from
the log first (so `Last-Event-ID` resumes with no gap and no duplicate, also after the task
ended or the daemon restarted), then live ones from the in-process hub; a client that falls
behind is served from the log, so it never slows the engine or another client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pydantic
from aiohttp import web

from reconciler import api, fanout, logs
from reconciler.api import BACKEND, ApiError
from state import errors, events, ids, loading, parsing, pending, results, spool, tasks
from state.errors import ErrorCode

SPOOL_RETRY_MS = 30_000  # a full disk is not freed in a moment

log = logs.get("http")

ADMIT_WAIT_S = 10.0  # how long POST /v1/tasks waits for the loop's admission verdict
RETRY_MS = 2000  # the SSE `retry:` a client waits before reconnecting


# Task ids whose POST is between its duplicate check and its file being in spool/incoming.
DELIVERING: web.AppKey[set[str]] = web.AppKey("delivering_task_ids")
# the name the request's task file was delivered under in spool/incoming/
DELIVERED: web.RequestKey[str] = web.RequestKey("delivered_file")


def add_routes(app: web.Application) -> None:
    app[ENCODED] = {}
    app[DELIVERING] = set()
    app.router.add_post("/v1/tasks", post_task)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    for path in ("/v1/tasks/{task_id}/events", "/v1/tasks/{task_id}/stream"):  # the digest's
        api.takes_query(  # name, beside ours
            app,
            app.router.add_get(path, task_events),
            once=("last_event_id", "cancel_on_disconnect"),
        )
    app.router.add_post("/v1/tasks/{task_id}/cancel", cancel_task)
    app.router.add_get("/v1/sessions/{session_id}", get_session)
    app.router.add_delete("/v1/sessions/{session_id}", delete_session)
    app.router.add_get("/v1/capabilities", capabilities)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/pools", get_pools)


ID_RULE = "{what} ids are 1 to 128 letters, digits, '.', '_' and '-' (no '..')"
_RESUME_HINT = (
    "send the id of the last event received (a whole number, 0 or more), or none to get "
    "every event from the first"
)


def _task_id(request: web.Request) -> ids.TaskId:
    value = request.match_info["task_id"]
    if not ids.is_safe_id(value):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"task id {ids.quoted(value)} is not a valid id",
            hint=ID_RULE.format(what="task"),
        )
    return ids.TaskId(value)


def _pending(backend: api.Backend, task_id: str) -> bool:
    """A task file for `task_id` waits in incoming/ (delivered, not yet claimed): the id it
    will be taken under, as intake decides (its `task_id:`, else its file name), whatever
    the file is called (`pending.task_id_of`)."""
    incoming = backend.spool.incoming
    for suffix in tasks.TASK_SUFFIXES:
        path = incoming / f"{task_id}{suffix}"
        if path.exists() and pending.task_id_of(path) == task_id:
            return True
    return task_id in _WAITING.ids(backend.spool)


class _Waiting:
    """The ids the files in incoming/ claim, each file read once (files arrive there whole,
    renamed in: a name keeps its content), so a lookup of an id under another file name
    costs a listing and the reads of the files new since the last one, not a read of every
    waiting file per request. Past MAX_FILES files (a burst) only names are matched: the
    daemon takes them in moments anyway."""

    MAX_FILES = 1000

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._ids: dict[str, str | None] = {}  # file name -> the id it gives its task

    def ids(self, the_spool: spool.Spool) -> set[str]:
        names = spool.incoming_names(the_spool)
        if len(names) > self.MAX_FILES:
            return set()
        if self._folder != the_spool.incoming:
            self._folder, self._ids = the_spool.incoming, {}
        known = self._ids
        self._ids = {
            name: known[name] if name in known else pending.task_id_of(the_spool.incoming / name)
            for name in names
        }
        return {task_id for task_id in self._ids.values() if task_id}


_WAITING = _Waiting()


def _known(backend: api.Backend, task_id: ids.TaskId) -> bool:
    """A task with a result, live, waiting in incoming/, or with an event log (one whose
    write failed waits in active/ for the recovery pass: its stream goes on from the log)."""
    return (
        backend.results.exists(task_id)
        or backend.live(task_id)
        or _pending(backend, task_id)
        or backend.results.events_path(task_id).is_file()
    )


async def post_task(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    body = await api.read_json(request)
    if not isinstance(body, dict):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "the body must be a JSON object (a task)",
            hint='send one task, e.g. {"model": "m1", "prompt": "hi", "max_tokens": 64}',
        )
    if body.get("task_id") is None:  # absent or null: one is made up
        body["task_id"] = f"t-{uuid.uuid4().hex[:16]}"
    header = request.headers.get("X-Session-Id")
    if header is not None:  # as on the OpenAI routes: the session a request belongs to
        if body.get("session_id") is None:
            body["session_id"] = header
        elif body["session_id"] != header:
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                "session_id: the body says one session and X-Session-Id another",
                hint="give the session once, in the body or in X-Session-Id",
                param="session_id",
            )
    body["correlation_id"] = api.correlation_of(request, body.get("correlation_id"))
    labels = body.get("labels")
    reserved = [k for k in tasks.RESERVED_LABELS if isinstance(labels, dict) and k in labels]
    if reserved:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"labels.{reserved[0]}: reserved for the tasks the OpenAI-compatible routes make "
            "(it changes how the daemon treats the task)",
            hint=f"remove labels.{reserved[0]}, or name the label otherwise",
            param=f"labels.{reserved[0]}",
        )
    try:
        task = tasks.TaskFile.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = loading.validation_errors(exc, tasks.TaskFile, None, "request body", body)
        top = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{top.field or 'body'}: {top.message}{more}",
            hint=top.hint or None,
        ) from None
    task_id = ids.TaskId(str(task.task_id))
    sub = await deliver(request, task)
    try:
        first = await _first_frame(sub)
    finally:
        backend.hub.unsubscribe(sub)
    if first is not None:
        await backend.settled()  # the answer's result file (queued or rejected) is on disk
        other = _taken_by_another(backend, task_id, request[DELIVERED])
        if other is not None:
            raise ApiError(
                ErrorCode.DUPLICATE_TASK_ID,
                f"task id {task_id!r} was taken at the same moment by the task file {other}; "
                "this request's task was not admitted",
                hint="give the task a new task_id, or GET /v1/tasks/{id} for the other one",
            )
    links = {
        "events_url": f"/v1/tasks/{task_id}/events",
        "result_url": f"/v1/tasks/{task_id}",
    }
    if first is not None and first.event == "error":
        envelope = errors.ErrorEnvelope.model_validate(first.data)
        response = api.error_response(envelope)
        response.headers["X-Task-Id"] = task_id
        return response
    data = first.data if first is not None else {}
    answer = {
        "task_id": task_id,
        "status": "queued" if first is not None else "delivered",
        "queue_position": data.get("queue_position"),
        "predicted_start_ms": data.get("predicted_start_ms"),
        "on_time_probability": data.get("on_time_probability"),
        "budgets": data.get("budgets"),
        "backoff_ms": 0,
        **links,
    }
    response = web.json_response(answer, status=202)
    response.headers.update(_budget_headers(data.get("budgets")))
    response.headers["X-Task-Id"] = task_id
    response.headers["Location"] = links["result_url"]
    return response


def _taken_by_another(backend: api.Backend, task_id: str, delivered: str) -> str | None:
    """The task file that holds `task_id` when it is not the one this request delivered
    (a file naming the same id was dropped into the spool at the same moment and claimed
    first: the request's own file is refused as a duplicate); None when the request's task
    is the one admitted, or no file is known."""
    result = backend.live_result(ids.TaskId(task_id)) or backend.results.read(task_id)
    source = result.source_file if result is not None else None
    if not source:
        return None
    name = source.rsplit("/", 1)[-1]
    # filed under a free name in done/ or failed/ (a namesake there): `<time_ns>-<name>`
    if name == delivered or re.fullmatch(r"\d+-" + re.escape(delivered), name):
        return None
    return source


def _budget_headers(budgets: Any) -> dict[str, str]:
    """`X-Budget-Tokens-Remaining` for a session task whose session has a token budget."""
    tokens = budgets.get("tokens_budget_remaining") if isinstance(budgets, dict) else None
    return {} if tokens is None else {"X-Budget-Tokens-Remaining": str(tokens)}


async def deliver(request: web.Request, task: tasks.TaskFile) -> fanout.Subscription:
    """Deliver `task` into the spool as POST /v1/tasks does, for every route that turns a
    request into a task: refuse an id already in use (409), subscribe to the task's frames
    (before delivery, so not even the first can be missed), deliver the file (fsynced before
    this returns) and wake the loop. The caller reads the subscription, then unsubscribes."""
    backend = request.app[BACKEND]
    if backend.stopping():  # no pass will admit it: the client would wait for the drain
        raise ApiError(
            ErrorCode.DAEMON_STOPPING,
            "the daemon is stopping: it takes no new task (its running tasks finish first)",
            retry_after_ms=api.STOPPING_RETRY_MS,
        )
    task_id = ids.TaskId(str(task.task_id))
    raw = task.model_dump_json(exclude_none=True).encode()
    _check_as_task_file(raw)
    delivering = request.app[DELIVERING]
    # the check and the reservation with no await between them: of two requests with one
    # id at once, the second sees the first's reservation until its file is in the spool
    has_result = backend.results.exists(task_id)
    existing = backend.results.read(task_id) if has_result else None
    busy = task_id in delivering or backend.live(task_id) or _pending(backend, task_id)
    # an earlier task's event log with no result beside it (removed by hand) holds the id too
    logged = not has_result and backend.results.events_path(task_id).is_file()
    # a task refused at the door (a 400, a 429) or ended with a retriable error: the task
    # sent again may reuse its id
    reuse = not busy and existing is not None and results.id_reusable(existing)
    if busy or logged or (has_result and not reuse):
        state = f" ({existing.status})" if existing else " (its event log is there)" * logged
        raise ApiError(
            ErrorCode.DUPLICATE_TASK_ID,
            f"task id {task_id!r} is already used{state}",
            hint="give the task a new task_id, or GET /v1/tasks/{id} for the old one",
        )
    delivering.add(task_id)
    after = 0
    if reuse:  # the old rejection's log and result go before anyone reads them for this one
        backend.results.take_over(task_id)
        # the new task's frames go on after the old one's ids: read from the first of them
        # (from 0, the first would look like frames missed, and be looked for in a log that
        # does not have it yet: it is written with the task's queued result)
        after = backend.results.taken_over.get(task_id, 0)
        cache = request.app[ENCODED]
        for key in [k for k in cache if k[0] == task_id]:
            del cache[key]
    sub = backend.hub.subscribe(task_id, backend.results.events_path(task_id), after=after)
    try:
        path = await asyncio.to_thread(
            spool.deliver, backend.spool, raw, name=f"{task_id}.task.json"
        )
        request[DELIVERED] = path.name
    except OSError as exc:  # a full disk, say: nothing was delivered
        backend.hub.unsubscribe(sub)
        logs.emit(
            log,
            "http.delivery_failed",
            f"Could not deliver task {task_id} into {backend.spool.root}: {exc.strerror or exc}.",
            level=40,
            task_id=task_id,
            correlation_id=request[api.CORRELATION],
        )
        raise ApiError(
            ErrorCode.SPOOL_UNWRITABLE,
            f"the task could not be written into the spool: {exc.strerror or exc}",
            retry_after_ms=SPOOL_RETRY_MS,
        ) from None
    except BaseException:
        backend.hub.unsubscribe(sub)
        raise
    finally:
        delivering.discard(task_id)  # from now on the spool (or the result) has the id
    backend.wake()
    logs.emit(
        log,
        "http.task_delivered",
        f"Delivered task {task_id} from {request[api.IDENTITY]}.",
        task_id=task_id,
        correlation_id=request[api.CORRELATION],
        identity=request[api.IDENTITY],
    )
    return sub


def _check_as_task_file(raw: bytes) -> None:
    """Refuse (400) a task the spool's intake would refuse as a file, before it is delivered:
    its bounds (nesting, value count) apply to the task file the request becomes, which
    holds a few more values than the request itself."""
    # the model is valid already (it was dumped from one): only the file's bounds remain
    _, _, problems = parsing.parse_json_document(raw.decode(), "request body", tree=False)
    if problems:
        first = problems[0]
        field = f"{first.field}: " if first.field else ""
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"request body (as a task file): {field}{first.message}",
            hint=first.hint or None,
            param=first.field,
        )


async def _first_frame(sub: Any) -> events.EventFrame | None:
    """The task's first frame (queued, or error for a rejection), or None if the loop did
    not get to it in time (it stays delivered; the loop admits it when it can)."""
    frames = sub.frames()
    try:
        return await asyncio.wait_for(anext(frames), ADMIT_WAIT_S)
    except (TimeoutError, StopAsyncIteration):
        return None
    finally:
        with contextlib.suppress(Exception):
            await frames.aclose()


async def get_task(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    task_id = _task_id(request)
    if backend.results.exists(task_id):
        await backend.settled()  # a result still in the pending commit is read from disk
        try:
            raw = await asyncio.to_thread(backend.results.path(task_id).read_bytes)
        except OSError:
            raw = b""
        damaged = _damaged(raw, task_id) if raw else None
        if raw and not damaged:
            return web.Response(body=raw, content_type="application/json")
    else:  # a folder (or other non-file) where the result goes is no result either
        problem = await asyncio.to_thread(backend.results.problem, task_id)
        damaged = logs.writable(problem) if problem is not None else None
    live = backend.live_result(task_id)
    if live is not None:  # its file gone or unreadable: what the daemon holds of it
        return web.json_response(live.model_dump(mode="json"))
    if damaged:  # never served as if it were a result
        raise _not_a_result(task_id, damaged)
    if _pending(backend, task_id):
        return web.json_response({"task_id": task_id, "status": "delivered"})
    raise ApiError(ErrorCode.NOT_FOUND, f"no task {task_id!r} here")


def _not_a_result(task_id: str, damaged: str) -> ApiError:
    return ApiError(
        ErrorCode.INTERNAL,
        f"results/{task_id}.json is not a result the daemon wrote: {damaged}",
        hint="it was changed outside the daemon; remove it (the task's event log keeps "
        "its frames) or put the right file back",
    )


def _damaged(raw: bytes, task_id: str) -> str | None:
    """Why `raw` is not `task_id`'s result file (cut short, not JSON, not a result, another
    task's), or None."""
    damage = results.damage(raw, task_id)
    return logs.writable(damage) if damage is not None else None


def _resume_after(request: web.Request) -> int:
    header, query = request.headers.get("Last-Event-ID"), request.query.get("last_event_id")
    if query == "":  # given, but empty: not "from the start", which is leaving it out
        raise ApiError(ErrorCode.INVALID_PARAMS, "?last_event_id is empty", hint=_RESUME_HINT)
    if header and query:
        # both: an EventSource opened with ?last_event_id=N reconnects to the same URL with
        # the header naming the last frame it saw since, so the header is the newer place
        # (a refusal would end that stream: EventSource does not retry a non-200). The
        # query is still held to being an id.
        _event_id(query, "?last_event_id")
        return _event_id(header, _HEADER)
    return _event_id(header or query or "0", _HEADER if header else "?last_event_id")


_HEADER = "the Last-Event-ID header"


def _event_id(given: str, name: str) -> int:
    """The event id `given` (as `name` gave it): ASCII digits, of any length (a header's
    value without the spaces HTTP allows around it; a query value exactly as given)."""
    digits = given.strip() if name == _HEADER else given
    # ASCII digits alone: int() also takes '١', '+3', '1_0' and a sign
    if digits.startswith("-") and digits[1:].isascii() and digits[1:].isdigit():
        raise ApiError(ErrorCode.INVALID_PARAMS, f"{name} must be 0 or more", hint=_RESUME_HINT)
    if not (digits.isascii() and digits.isdigit()):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{name} {logs.writable(given[:40])!r} is not an event id",
            hint=_RESUME_HINT,
        )
    # leading zeros are a number still; one past any log's last id is as good as any bigger
    # (and a header line is at most 8 KiB: no huge int is built from it)
    significant = digits.lstrip("0") or "0"  # (int() refuses over 4,300 digits, zeros too)
    return 10**20 if len(significant) > 20 else int(significant)


async def task_events(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    task_id = _task_id(request)
    after = _resume_after(request)
    if not _known(backend, task_id):
        raise ApiError(ErrorCode.NOT_FOUND, f"no task {task_id!r} here")
    # subscribed before anything here waits: a frame the daemon publishes meanwhile (a task
    # rejected as it is taken: its only frame, still in the pending commit, not yet in the
    # log) reaches this reader live; subscribed later, it would wait for it for ever
    sub = backend.hub.subscribe(task_id, backend.results.events_path(task_id), after=after)
    try:
        return await _task_events(request, backend, task_id, after, sub)
    finally:
        backend.hub.unsubscribe(sub)


async def _task_events(
    request: web.Request,
    backend: api.Backend,
    task_id: ids.TaskId,
    after: int,
    sub: fanout.Subscription,
) -> web.StreamResponse:
    cancel_on_disconnect = api.query_flag(request, "cancel_on_disconnect")
    headers = {
        "X-Correlation-Id": request[api.CORRELATION],
        "X-Accel-Buffering": "no",
        "Cache-Control": "no-cache",
    }
    await backend.settled()  # a queued result still in the pending commit is on disk
    known = await asyncio.to_thread(backend.results.read, task_id)
    if after and known is not None and known.terminal:
        path = backend.results.events_path(task_id)
        last = await asyncio.to_thread(events.last, path)
        if last is not None and last.terminal and last.id <= after:
            # the client has the end already: 204 is what stops an EventSource reconnecting
            return web.Response(status=204, headers=headers)
    ended_without_end: list[events.EventFrame] | None = None
    # not live, and no file waiting, but a result file: nothing more will come to its log
    # (a result file that cannot be read is not written by anybody either)
    ended = not backend.live(task_id) and (
        (known is not None and known.terminal)
        or (
            known is None
            and not _pending(backend, task_id)
            and await asyncio.to_thread(backend.results.problem, task_id) is not None
        )
    )
    if ended:
        path = backend.results.events_path(task_id)
        damaged: list[int] = []
        logged = await asyncio.to_thread(lambda: list(events.read(path, damaged=damaged)))
        if damaged:
            fanout.say_damaged(path, damaged)
        if not logged or not logged[-1].terminal:  # the log was removed or cut by hand
            ended_without_end = [f for f in logged if f.id > after]
            if not ended_without_end:
                if not logged and not after:
                    there = await asyncio.to_thread(path.exists)
                    raise ApiError(
                        ErrorCode.NOT_FOUND,
                        f"task {task_id!r} {_ended(known)} but its event log "
                        f"results/{path.name} "
                        + ("holds no whole frame (cut or changed by hand)" if there else "is gone"),
                        hint=f"GET /v1/tasks/{task_id} for its result",
                    )
                return web.Response(status=204, headers=headers)  # nothing more will come
    if known is not None and known.budgets is not None:  # as at the task's acceptance
        headers.update(_budget_headers(known.budgets.model_dump()))
    if request.method == "HEAD":  # the same headers as GET's stream
        return api.stream_head(headers)
    if ended_without_end is not None:
        return await _log_without_end(request, headers, task_id, ended_without_end, known)
    finished = stopped = False
    try:
        async with api.event_stream(request, headers) as stream:
            first = True
            looked_again = False  # the log was read again for a task that had ended
            async for batch in sub.batches(wait_s=api.WATCH_S):
                if not batch:  # nothing new: a client gone is seen without a write
                    if await _ended_without_frames(backend, task_id):
                        if looked_again:  # the log lacks frames written (changed by hand)
                            known = await asyncio.to_thread(backend.results.read, task_id)
                            await stream.write(_lacks_its_end(task_id, known))
                            finished = True
                            break
                        looked_again = True  # the end may be on its way: read the log
                        sub.lagging = True
                        sub.ready.set()
                        continue
                    if backend.closing.is_set() or _idle_until_restart(backend, task_id):
                        # the daemon stops: the stream ends whole, as soon as the task will
                        # not move before the next start
                        stopped = True
                        await stream.write(_STOPPED_COMMENT)
                        break
                    if api.client_gone(request):
                        break
                    continue
                # one write per batch, each frame encoded once however many clients read it
                cache = request.app[ENCODED]
                chunk = "".join(_encoded(cache, task_id, frame) for frame in batch)
                if first:
                    chunk = f"retry: {RETRY_MS}\n" + chunk
                    first = False
                if batch[-1].terminal:  # sent once the result it ends with is on disk
                    await backend.settled()
                await stream.write(chunk.encode())
                if batch[-1].terminal:
                    finished = True
                    break
            return stream
    finally:
        backend.hub.unsubscribe(sub)
        if cancel_on_disconnect and not (finished or stopped):
            await asyncio.to_thread(spool.request_cancel, backend.spool, task_id)
            backend.wake()


async def _ended_without_frames(backend: api.Backend, task_id: ids.TaskId) -> bool:
    """The task has ended (not live, no file waiting, its result terminal) while a stream of
    it still waits: its end will not come live any more (its log was removed or replaced by
    hand while it ran, so what the hub handed over could not be matched with the log)."""
    if backend.live(task_id) or _pending(backend, task_id):
        return False
    known = await asyncio.to_thread(backend.results.read, task_id)
    return known is not None and known.terminal


def _lacks_its_end(task_id: str, known: results.Result | None) -> bytes:
    return (
        f": the event log lacks frames the task wrote (changed or removed by hand); the task "
        f"{_ended(known)}: GET /v1/tasks/{task_id} for its result\n\n"
    ).encode()


def _idle_until_restart(backend: api.Backend, task_id: ids.TaskId) -> bool:
    """The daemon drains and this task is not among the running ones: it waits (queued, or
    in incoming/) until the daemon's next start, so a stream of it has nothing to wait for."""
    if not backend.stopping():
        return False
    return not backend.live(task_id) or backend.queue_position(task_id) is not None


# the last words of a stream the daemon ends as it stops (an EventSource reconnects to the
# restarted daemon after `retry:`, resuming with Last-Event-ID; the task stays resumable)
_STOPPED_COMMENT = b": the daemon is stopping; reconnect with Last-Event-ID to resume\n\n"


async def _log_without_end(
    request: web.Request,
    headers: dict[str, str],
    task_id: str,
    frames: list[events.EventFrame],
    known: results.Result | None,
) -> web.StreamResponse:
    """The frames of a finished task whose log lacks its terminal frame (cut or emptied by
    hand), then the end of the stream with a comment saying so: nothing more will come, so
    the stream must not wait for it (a reconnect after them is answered 204)."""
    cache = request.app[ENCODED]
    async with api.event_stream(request, headers) as stream:
        chunk = f"retry: {RETRY_MS}\n" + "".join(_encoded(cache, task_id, f) for f in frames)
        chunk += (
            f": the event log ends before its terminal frame; the task {_ended(known)}: "
            f"GET /v1/tasks/{task_id} for its result\n\n"
        )
        await stream.write(chunk.encode())
        return stream


def _ended(known: results.Result | None) -> str:
    """How a task no longer live ended, as far as its result file says."""
    if known is not None:
        return f"ended ({known.status})"
    return "is not live, and its result file cannot be read"


# Per server (one daemon's task ids are unique; another daemon in the same process may reuse
# them, so the cache must not be shared across apps).
ENCODED: web.AppKey[dict[tuple[str, int, str, str], str]] = web.AppKey("encoded_frames")
ENCODED_MAX = 4096


def _encoded(
    cache: dict[tuple[str, int, str, str], str], task_id: str, frame: events.EventFrame
) -> str:
    """The frame as an SSE message, encoded once for every client that reads it (a small
    cache: fifty clients of one task share each token's text). Keyed by the frame's event
    and time too: an id taken over after a 429 starts its log again from frame 1."""
    key = (task_id, frame.id, frame.event, frame.ts)
    text = cache.get(key)
    if text is None:
        data = json.dumps(frame.data, ensure_ascii=False)
        text = f"id: {frame.id}\nevent: {frame.event}\ndata: {data}\n\n"
        if len(cache) >= ENCODED_MAX:
            cache.clear()
        cache[key] = text
    return text


async def cancel_task(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    task_id = _task_id(request)
    await api.no_body_fields(request)
    existing = _result(backend, task_id)
    if existing is not None and existing.terminal:
        return web.json_response({"task_id": task_id, "status": existing.status})
    if not _known(backend, task_id):
        raise ApiError(
            ErrorCode.NOT_FOUND, f"no task {task_id!r} is queued, running or finished here"
        )
    if existing is None and not backend.live(task_id) and not _pending(backend, task_id):
        # a result file there that cannot be read, of a task the daemon does not hold: it
        # ended; a cancel request would wait for ever (and hit a later task of this id)
        problem = await asyncio.to_thread(backend.results.problem, task_id)
        if problem is not None:
            raise _not_a_result(task_id, logs.writable(problem))
        # no result file (removed by hand) but its event log: ended if the log says so
        last = await asyncio.to_thread(events.last, backend.results.events_path(task_id))
        if last is not None and last.terminal:
            return web.json_response({"task_id": task_id, "status": _status_of(last)})
    await asyncio.to_thread(spool.request_cancel, backend.spool, task_id)
    backend.wake()
    logs.emit(
        log,
        "http.cancel",
        f"Cancel of task {task_id} requested by {request[api.IDENTITY]}.",
        task_id=task_id,
        correlation_id=request[api.CORRELATION],
    )
    # the loop applies the request at its next pass, within moments: a queued task (and a
    # running one whose engine stops at once) is answered canceled, not cancel-requested
    settle_by = time.monotonic() + CANCEL_SETTLE_S
    while backend.live(task_id) and time.monotonic() < settle_by:
        await asyncio.sleep(0.01)
    if not backend.live(task_id):
        await backend.settled()  # its terminal result on disk before it is read
    # the task may have ended while the request was written (the daemon drops the request)
    ended = _result(backend, task_id)
    if ended is not None and ended.terminal:
        return web.json_response({"task_id": task_id, "status": ended.status})
    return web.json_response({"task_id": task_id, "status": "cancel-requested"}, status=202)


CANCEL_SETTLE_S = 0.5  # how long a cancel's answer waits for the task to end


def _result(backend: api.Backend, task_id: str) -> results.Result | None:
    """The task's result as it stands (with what the pending commits will write)."""
    return backend.results.read(task_id) if backend.results.exists(task_id) else None


def _status_of(frame: events.EventFrame) -> str:
    """A task's status as its terminal frame tells it (for a task whose result is gone)."""
    if frame.event == "error":
        return "failed"
    return "canceled" if frame.data.get("finish_reason") == "canceled" else "succeeded"


def _session_id(request: web.Request) -> str:
    value = request.match_info["session_id"]
    if not ids.is_safe_id(value):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"session id {ids.quoted(value)} is not a valid id",
            hint=ID_RULE.format(what="session"),
        )
    return value


async def get_session(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    sid = _session_id(request)
    session = backend.sessions.get(sid)
    if session is None:
        raise ApiError(
            ErrorCode.NOT_FOUND,
            f"no session {sid!r}",
            hint="a session exists once a task names it (session_id, or the X-Session-Id "
            "header); it is gone after sessions.ttl_s without use, or a DELETE",
        )
    state = backend.config.state
    ttl_s = state.sessions.ttl_s if state else 600.0
    if session.evicted:
        left = 0.0
    elif any(backend.live(ids.TaskId(t)) for t in session.turn_task_ids[-16:]):
        left = ttl_s  # a turn queued or running: a session in use does not expire
    else:
        left = max(0.0, ttl_s - (time.time() - session.last_used_at))
    return web.json_response(
        {
            "session_id": sid,
            "turns": session.turns,
            "tokens_out": session.tokens_out,
            "ttl_ms_remaining": int(left * 1000),
            # what a new turn may ask for: its live turns' max_tokens held (null: no budget)
            "tokens_budget_remaining": (
                None if session.evicted else backend.session_tokens_left(sid)
            ),
            "kv_warmth": session.last_replica_id is not None and not session.evicted,
            "last_replica_id": session.last_replica_id,
            "evicted": session.evicted,
        }
    )


async def delete_session(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    sid = _session_id(request)
    await api.no_body_fields(request)
    backend.sessions.remove(sid)
    return web.Response(status=204)


async def capabilities(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    status = backend.status()
    state = backend.config.state
    pools = []
    for pool in status.pools:
        spec = state.pool(pool.id) if state else None
        ready = [r for r in pool.replicas if r.state == "Ready"]
        pools.append(
            {
                "pool_id": pool.id,
                "engine": pool.engine,
                "engine_version": next((r.engine_version for r in ready if r.engine_version), None),
                "model": pool.model,
                "state": pool.state,
                "ctx": spec.ctx if spec else None,
                "slots": spec.slots if spec else None,
                "max_tokens": spec.max_tokens if spec else None,
                "replicas_ready": len(ready),
                "concurrency": sum(r.slots_total for r in ready),
                "gpus": sorted({g for r in ready for g in r.gpu}),
            }
        )
    return web.json_response(
        {
            "api_version": api.API_VERSION,
            "concurrency": sum(p["concurrency"] for p in pools),
            "pools": pools,
        }
    )


async def get_status(request: web.Request) -> web.StreamResponse:
    status = request.app[BACKEND].status()
    return web.json_response(status.model_dump(mode="json"))


async def get_pools(request: web.Request) -> web.StreamResponse:
    status = request.app[BACKEND].status()
    return web.json_response({"pools": [p.model_dump(mode="json") for p in status.pools]})
