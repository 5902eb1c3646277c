"""The model catalog over HTTP: GET /v1/catalog/models, GET /v1/catalog/models/{id} and
POST /v1/catalog/models/{id}/verify. `api_routes.start` adds these with `routes(catalog)`.

The models are those of the applied orch.yaml; `cataloging.Catalog` knows their files and
keeps the verification records. A verify answers 200 with its record whatever the outcome
(`pass`, `warn` or `fail`, with `blocked` saying whether admission now refuses the model),
and wakes the loop so tasks queued for a model that just failed are failed at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from reconciler import api, api_tasks, cataloging
from reconciler.api import BACKEND, ApiError
from state import desired, ids
from state.errors import ErrorCode

CATALOG: web.AppKey[cataloging.Catalog] = web.AppKey("catalog")


RETRY: web.AppKey[Callable[[str], None]] = web.AppKey("retry_model")


def routes(
    catalog: cataloging.Catalog, retry: Callable[[str], None] = lambda model_id: None
) -> api.Routes:
    """The catalog routes; `retry(model_id)` after a check that passes or warns: the
    replicas that gave up on that model's file get a fresh start."""

    def add_routes(app: web.Application) -> None:
        app[CATALOG] = catalog
        app[RETRY] = retry
        app.router.add_get("/v1/catalog/models", list_models)
        app.router.add_get("/v1/catalog/models/{model_id}", get_model)
        app.router.add_post("/v1/catalog/models/{model_id}/verify", verify_model)

    return add_routes


def _state(request: web.Request) -> desired.DesiredState:
    state = request.app[BACKEND].config.state
    if state is None:  # the daemon starts only with a config, so this is not reached
        raise ApiError(ErrorCode.INTERNAL, "no config is applied")
    return state


def _model_id(request: web.Request, state: desired.DesiredState) -> str:
    model_id = request.match_info["model_id"]
    if not ids.is_safe_id(model_id):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{ids.quoted(model_id)} is not a model id",
            hint=api_tasks.ID_RULE.format(what="model"),
        )
    if model_id not in state.models:
        raise ApiError(
            ErrorCode.MODEL_UNKNOWN,
            f"model {model_id!r} is not in orch.yaml",
            hint=f"use one of: {', '.join(sorted(state.models)) or 'no models defined'}",
        )
    return model_id


async def list_models(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    state = _state(request)
    rows = await asyncio.to_thread(request.app[CATALOG].rows, state, backend.config.base)
    return web.json_response({"revision": backend.config.revision, "models": rows})


async def get_model(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    state = _state(request)
    model_id = _model_id(request, state)
    rows = await asyncio.to_thread(request.app[CATALOG].rows, state, backend.config.base)
    return web.json_response(next(r for r in rows if r["id"] == model_id))


async def verify_model(request: web.Request) -> web.StreamResponse:
    backend = request.app[BACKEND]
    catalog = request.app[CATALOG]
    state = _state(request)
    model_id = _model_id(request, state)
    await api.no_body_fields(request)
    record = await catalog.verify(model_id, state, backend.config.base)
    if record.status != "fail":  # the file is right now: what gave up on it may start again
        request.app[RETRY](model_id)
    backend.wake()
    blocked = model_id in catalog.blocked(backend.config.state)
    return web.json_response(record.model_dump(mode="json") | {"blocked": blocked})
