"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`, so Aider, Continue, OpenCode and the OpenAI SDKs can use the daemon.
`api.make_app` adds them beside the task routes (docs/http.md, docs/agents.md).

Every request becomes a task through the same path as POST /v1/tasks (`api_tasks.deliver`:
durable in the spool before anything is answered, then the loop's admission), so its result
file and event log are written as for any task, and queueing, placement, sessions and
cancel work the same. The request's shape is mapped by `openai_requests` (refusing what it
cannot honour, by name); the answer is made from the task's frames by `openai_chunks`.

- The answer's headers say `X-Task-Id`, `X-Queue-Position` and `X-Predicted-Start-Ms`.
- A rejection is OpenAI's error shape with the code's status; a 429 (or 503) carries
  `Retry-After`, `Retry-After-Ms` and `x-should-retry: true`, which the OpenAI SDKs obey, and
  every other error `x-should-retry: false`, so a client retries only what can succeed.
- While a streamed request waits in the queue it gets an SSE comment with its position every
  `QUEUE_COMMENT_S`; an idle stream gets `: ping` every `api.PING_S`.
- A client that goes away before the end cancels its task (spool/cancel/<id>), streamed or
  not: nobody is left to read the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from aiohttp import web

from reconciler import admission, api, api_tasks, fanout, logs, openai_chunks, openai_requests
from reconciler.api import BACKEND, ApiError
from state import errors, events, ids, spool
from state.errors import ErrorCode

log = logs.get("http")

QUEUE_COMMENT_S = 1.0  # how often a waiting stream hears its queue position
_STOPPED: web.RequestKey[bool] = web.RequestKey("answered_stopping")  # said DAEMON_STOPPING


def add_routes(app: web.Application) -> None:
    for route in (
        app.router.add_get("/v1/models", list_models),
        app.router.add_get("/v1/models/{model_id}", get_model),
        app.router.add_post("/v1/chat/completions", chat_completions),
        app.router.add_post("/v1/completions", completions),
    ):
        api.shape_errors(app, route, error_response)
        api.takes_query(app, route, any_names=True)  # as OpenAI's API: SDKs may add their own
    # OpenAI's other endpoints (and near misses such as a trailing slash): an SDK reads the
    # 404 in its own shape
    api.shape_prefixes(app, OPENAI_PREFIXES, error_response)


OPENAI_PREFIXES = (
    "/v1/chat/",
    "/v1/completions",
    "/v1/models",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/audio/",
    "/v1/images/",
    "/v1/moderations",
    "/v1/files",
    "/v1/assistants",
    "/v1/threads",
    "/v1/batches",
    "/v1/fine_tuning/",
)


def error_response(
    envelope: errors.ErrorEnvelope, status: int | None = None, param: str | None = None
) -> web.Response:
    """An error in OpenAI's shape (`api.ErrorShape` of these routes)."""
    code = status or openai_chunks.status_of(envelope)
    response = web.json_response(
        openai_chunks.error_body(envelope, status=code, param=param), status=code
    )
    retry = code in (429, 503) and envelope.retriable
    response.headers["x-should-retry"] = "true" if retry else "false"
    if retry:
        wait_ms = envelope.retry_after_ms or 1000
        response.headers["Retry-After"] = str(max(1, -(-wait_ms // 1000)))
        response.headers["Retry-After-Ms"] = str(wait_ms)
        response.headers["X-Backoff-Ms"] = str(wait_ms)
    return response


# -- models -------------------------------------------------------------------------------


def _models(backend: api.Backend) -> list[dict[str, Any]]:
    """orch.yaml's models with the state of the pools that serve them."""
    state = backend.config.state
    if state is None:
        return []
    since = backend.config.models_since  # when a config first named each model

    def created(model_id: str) -> int:
        applied = since.get(model_id) or backend.config.applied_at
        return int(datetime.fromisoformat(applied).timestamp()) if applied else 0

    pools = {p.id: p for p in backend.status().pools}
    blocked = backend.blocked()
    listed = []
    for model_id, spec in state.models.items():
        serving = [pools[p.id] for p in state.pools if p.model == model_id and p.id in pools]
        listed.append(
            {
                "id": model_id,
                "object": "model",
                "created": created(model_id),
                "owned_by": "llama-orch",
                "state": spec.state,
                "ready": spec.state == "Active"
                and model_id not in blocked
                and any(p.state == "Ready" for p in serving),
                "pools": [
                    {
                        "pool_id": p.id,
                        "state": p.state,
                        "reason": p.reason,
                        "replicas_ready": sum(r.state == "Ready" for r in p.replicas),
                    }
                    for p in serving
                ],
            }
        )
    return listed


async def list_models(request: web.Request) -> web.StreamResponse:
    return web.json_response({"object": "list", "data": _models(request.app[BACKEND])})


async def get_model(request: web.Request) -> web.StreamResponse:
    wanted = request.match_info["model_id"]
    backend = request.app[BACKEND]
    state = backend.config.state
    # a pool id names a model too, as in a request's `model` (the pool's model, pinned)
    pooled = next((p.model for p in state.pools if p.id == wanted), None) if state else None
    for model in _models(backend):
        if model["id"] in (wanted, pooled):
            return web.json_response(model)
    raise ApiError(ErrorCode.MODEL_UNKNOWN, f"model {wanted[:128]!r} is not in orch.yaml")


# -- completions --------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "text")


class _Frames:
    """A task's frames, read with a timeout that does not lose the pending read."""

    def __init__(self, sub: fanout.Subscription) -> None:
        self._frames = sub.frames()
        self._pending: asyncio.Future[events.EventFrame] | None = None

    async def next(self, timeout_s: float) -> events.EventFrame | None:
        """The next frame, or None when none came within `timeout_s`."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
        done, _ = await asyncio.wait({self._pending}, timeout=timeout_s)
        if not done:
            return None
        finished, self._pending = self._pending, None
        return finished.result()

    async def _read(self) -> events.EventFrame:
        return await anext(self._frames)

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.wait({self._pending})  # let the read end before closing its source
        with contextlib.suppress(Exception):
            await self._frames.aclose()


async def _serve(request: web.Request, kind: openai_requests.Kind) -> web.StreamResponse:
    backend = request.app[BACKEND]
    state = backend.config.state
    if state is None:
        raise ApiError(ErrorCode.POOL_UNAVAILABLE, "no configuration is applied yet")
    body = await api.read_json(request)
    task_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    try:
        plan = openai_requests.plan(
            body,
            kind=kind,
            task_id=task_id,
            state=state,
            session_header=request.headers.get("X-Session-Id"),
            correlation_id=request[api.CORRELATION],
            tokens_left=backend.session_tokens_left,
        )
    except openai_requests.Refused as exc:
        backend.metrics.refused_at_the_door(exc.code)
        raise ApiError(exc.code, exc.message, param=exc.param, hint=exc.hint) from None
    model = plan.task.model or plan.task.pool or ""
    relay = openai_chunks.Relay(
        kind=kind,
        id=task_id,
        model=body["model"],
        created=int(time.time()),
        include_usage=plan.include_usage,
        prompt_estimate=admission.prompt_tokens(plan.task),
    )
    sub = await api_tasks.deliver(request, plan.task)
    frames = _Frames(sub)
    finished = False
    try:
        first = await frames.next(api_tasks.ADMIT_WAIT_S)
        if first is not None and first.event == "error":
            finished = True
            # its rejected result on disk first, as POST /v1/tasks answers: a client that
            # reads results/<X-Task-Id>.json after the answer finds the refusal there
            await request.app[BACKEND].settled()
            envelope = errors.ErrorEnvelope.model_validate(first.data)
            param = openai_requests.param_named(envelope.message)
            refusal = error_response(envelope, param=param)
            refusal.headers["X-Task-Id"] = task_id
            return refusal
        headers = _headers(request, task_id, first)
        serve = _stream if plan.stream else _whole
        answer, finished = await serve(request, relay, frames, first, headers)
        return answer
    finally:
        await frames.close()
        backend.hub.unsubscribe(sub)
        if not finished:  # the client went away, or the daemon stops: nobody will read it
            await asyncio.to_thread(spool.request_cancel, backend.spool, ids.TaskId(task_id))
            backend.wake()
            if request.get(_STOPPED):
                event, text = "http.answer_stopped", "was answered DAEMON_STOPPING"
            else:
                event, text = "http.client_gone", "went away"
            logs.emit(
                log,
                event,
                f"The client of task {task_id} {text}; its task is canceled.",
                task_id=task_id,
                correlation_id=request[api.CORRELATION],
                model=model,
            )


def _headers(request: web.Request, task_id: str, first: events.EventFrame | None) -> dict[str, str]:
    headers = {"X-Task-Id": task_id, "X-Correlation-Id": request[api.CORRELATION]}
    data = first.data if first is not None else {}
    if data.get("queue_position") is not None:
        headers["X-Queue-Position"] = str(data["queue_position"])
    if data.get("predicted_start_ms") is not None:
        headers["X-Predicted-Start-Ms"] = str(data["predicted_start_ms"])
    return headers


async def _after(
    request: web.Request, frames: _Frames, first: events.EventFrame | None, wait_s: float
) -> AsyncIterator[events.EventFrame | None]:
    """`first`, then the task's frames up to the terminal one; None after each `wait_s`
    without a frame. Ends early when the client is gone. The terminal frame comes once the
    result it ends with is on disk."""
    settled = request.app[BACKEND].settled
    if first is not None:
        if first.terminal:
            await settled()
        yield first
        if first.terminal:
            return
    while not api.client_gone(request):
        try:
            frame = await frames.next(wait_s)
        except StopAsyncIteration:
            return
        if frame is not None and frame.terminal:
            await settled()
        yield frame
        if frame is not None and frame.terminal:
            return


async def _stream(
    request: web.Request,
    relay: openai_chunks.Relay,
    frames: _Frames,
    first: events.EventFrame | None,
    headers: dict[str, str],
) -> tuple[web.StreamResponse, bool]:
    """Relay the frames as SSE `data:` chunks; (response, whether the task's end was sent)."""
    backend = request.app[BACKEND]
    task_id = ids.TaskId(relay.id)
    response = web.StreamResponse(
        headers=headers
        | {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    started, last_sent = False, loop.time()
    try:
        async for frame in _after(request, frames, first, min(api.WATCH_S, QUEUE_COMMENT_S)):
            now = loop.time()
            if frame is None and backend.closing.is_set():  # the daemon stops: said so
                request[_STOPPED] = True
                envelope = api.stopping_envelope()
                chunk = openai_chunks.error_body(envelope, status=openai_chunks.status_of(envelope))
                await response.write(_data(chunk))
                await response.write_eof()
                return response, False
            if frame is None or frame.event == "queued":
                if started:
                    if now - last_sent >= api.PING_S:
                        await response.write(b": ping\n\n")
                        last_sent = now
                elif frame is not None or now - last_sent >= QUEUE_COMMENT_S:
                    position = backend.queue_position(task_id)
                    if position is None and frame is not None:
                        position = frame.data.get("queue_position")
                    if position is not None:
                        await response.write(f": queue position {position}\n\n".encode())
                        last_sent = now
                continue
            started = started or frame.event == "started"
            chunks = relay.feed(frame)
            if chunks:
                await response.write(b"".join(_data(c) for c in chunks))
                last_sent = now
            if frame.terminal:
                if frame.event == "end" and frame.data.get("finish_reason") != "canceled":
                    await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response, True
    except ConnectionError:  # the client closed the connection while we wrote
        pass
    return response, False


def _data(chunk: dict[str, Any]) -> bytes:
    return (
        b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    )


async def _whole(
    request: web.Request,
    relay: openai_chunks.Relay,
    frames: _Frames,
    first: events.EventFrame | None,
    headers: dict[str, str],
) -> tuple[web.StreamResponse, bool]:
    """Wait for the task's end; (the whole answer or its error, whether the task ended)."""
    backend = request.app[BACKEND]
    last: events.EventFrame | None = None
    async for frame in _after(request, frames, first, api.WATCH_S):
        if frame is not None and frame.terminal:
            last = frame
        elif frame is None and backend.closing.is_set():  # the daemon stops: said so
            request[_STOPPED] = True
            response = error_response(api.stopping_envelope())
            response.headers.update(headers)
            return response, False
    if last is None:
        return web.Response(status=499), False  # nobody is left to read it
    if last.event == "error":
        envelope = errors.ErrorEnvelope.model_validate(last.data)
    elif last.data.get("finish_reason") == "canceled":
        envelope = openai_chunks.canceled()
    else:
        result = await asyncio.to_thread(backend.results.read, relay.id)
        if result is not None:
            body = openai_chunks.whole(
                result,
                kind=relay.kind,
                id=relay.id,
                model=relay.model,
                created=relay.created,
                prompt_estimate=relay.prompt_estimate,
            )
            return web.json_response(body, headers=headers), True
        envelope = errors.envelope(ErrorCode.INTERNAL, f"the result of {relay.id} is unreadable")
    response = error_response(envelope)
    response.headers.update(headers)
    return response, True
