"""Pool control over HTTP: POST /v1/pools/{id}/drain and POST /v1/pools/{id}/reload.
`api_routes.start` adds these with `routes(runtime, reloader)`.

A drain is recorded (`pools.PoolRuntime.drain_pool`, persisted in `.orch/drains.json`) and
answered at once with 202; the loop drains the replicas, giving in-flight tasks `deadline_ms`,
and starts none until a reload or a change of the pool's config. A reload (`reloading`) edits
orch.yaml in place and answers only once the pool is Ready on the new spec (200), or once it
has put the old file back (409 RELOAD_FAILED).
"""

from __future__ import annotations

from typing import Annotated, TypeVar

import pydantic
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from reconciler import api, api_tasks, pools, reloading
from reconciler.api import BACKEND, ApiError
from state import desired, ids, loading
from state.errors import ErrorCode

RUNTIME: web.AppKey[pools.PoolRuntime] = web.AppKey("pool_runtime")
RELOADER: web.AppKey[reloading.Reloader] = web.AppKey("reloader")
MAX_DEADLINE_MS = 24 * 3600 * 1000
M = TypeVar("M", bound=BaseModel)
# no control characters, nor the line and paragraph separators YAML also reads as breaks
Ref = Annotated[
    str, Field(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$")
]


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a number here

    deadline_ms: int | None = Field(None, ge=0, le=MAX_DEADLINE_MS)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: desired.Id | None = None
    model_ref: Ref | None = None
    timeout_s: float | None = Field(None, gt=0, le=3600)


def routes(runtime: pools.PoolRuntime, reloader: reloading.Reloader) -> api.Routes:
    def add_routes(app: web.Application) -> None:
        app[RUNTIME] = runtime
        app[RELOADER] = reloader
        app.router.add_post("/v1/pools/{pool_id}/drain", drain_pool)
        app.router.add_post("/v1/pools/{pool_id}/reload", reload_pool)

    return add_routes


def _pool(request: web.Request) -> desired.PoolSpec:
    pool_id = request.match_info["pool_id"]
    if not ids.is_safe_id(pool_id):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{ids.quoted(pool_id)} is not a pool id",
            hint=api_tasks.ID_RULE.format(what="pool"),
        )
    state = request.app[BACKEND].config.state
    pool = state.pool(pool_id) if state is not None else None
    if state is None or pool is None:
        known = ", ".join(p.id for p in state.pools) if state else ""
        raise ApiError(
            ErrorCode.NOT_FOUND,
            f"no pool {pool_id!r} in orch.yaml",
            hint=f"pools: {known or 'none defined'}",
        )
    return pool


async def _body(request: web.Request, model: type[M]) -> M:
    """The request's JSON body as `model`; an empty body is `{}`."""
    body = await api.read_json(request) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "the body must be a JSON object",
            hint="send {} for the defaults, or an object with the fields this route takes "
            "(GET /openapi.yaml)",
        )
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = loading.validation_errors(exc, model, None, "request body", body)
        top = problems[0]
        raise ApiError(
            ErrorCode.INVALID_PARAMS, f"{top.field or 'body'}: {top.message}", hint=top.hint
        ) from None


async def drain_pool(request: web.Request) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    pool = _pool(request)
    body = await _body(request, DrainRequest)
    state = request.app[BACKEND].config.state
    assert state is not None
    deadline_ms = body.deadline_ms
    if deadline_ms is None:
        deadline_ms = round(state.timeouts.drain_s * 1000)
    before = runtime.drained.get(pool.id)
    record = runtime.drain_pool(pool, deadline_ms=deadline_ms)
    if before is not record:  # a new drain, not the same request again
        request.app[BACKEND].metrics.drained(pool.id, "api_request")
    replicas = sorted(r.replica_id for r in runtime.replicas.values() if r.pool_id == pool.id)
    return web.json_response(
        {
            "pool_id": pool.id,
            "state": "Stopped" if not replicas else "Draining",
            "deadline_ms": record.deadline_ms,
            "drained_at": record.drained_at,
            "replicas": replicas,
        },
        status=200 if before is record else 202,
    )


async def reload_pool(request: web.Request) -> web.StreamResponse:
    reloader = request.app[RELOADER]
    pool = _pool(request)
    body = await _body(request, ReloadRequest)
    if body.model is not None and body.model_ref is not None:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "give model (another model for the pool) or model_ref (another file for its "
            "model), not both",
            hint="send one of the two",
        )
    try:
        done = await reloader.reload(
            pool.id, model=body.model, model_ref=body.model_ref, timeout_s=body.timeout_s
        )
    except reloading.ReloadError as exc:
        retry = api.STOPPING_RETRY_MS if exc.code is ErrorCode.DAEMON_STOPPING else None
        raise ApiError(exc.code, exc.message, hint=exc.hint, retry_after_ms=retry) from None
    return web.json_response(
        {
            "pool_id": done.pool_id,
            "model": done.model,
            "model_ref": done.model_ref,
            "revision": done.revision,
            "previous_revision": done.previous_revision,
            "replicas": done.replicas,
            "changed": done.changed,
            "took_ms": done.took_ms,
        }
    )
