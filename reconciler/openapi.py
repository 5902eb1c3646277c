"""The OpenAPI description of the HTTP face: built from one route table and the pydantic
models, written to schemas/openapi.yaml by `orchctl schemas` and served at /openapi.yaml.

`tests/test_openapi.py` fails when a route of the running app is missing here or the other
way round, and when the committed file differs from what this module builds; schemathesis
then checks a live daemon against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from pydantic.json_schema import models_json_schema

from reconciler import api
from state import artifacts, errors, results, statusfile, tasks

TITLE = "llama-orch home"
NAME = "openapi.yaml"

ERROR = {"$ref": "#/components/schemas/ErrorEnvelope"}
OBJECT: dict[str, Any] = {"type": "object"}
# an id in a path: what state.ids.is_safe_id takes (and no '..', which a pattern cannot say)
ID = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"}


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": ID}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema} | (
        {"description": description} if description else {}
    )


TASK_ID = _path_id("task_id")
SESSION_ID = _path_id("session_id")
POOL_ID = _path_id("pool_id")
MODEL_ID = _path_id("model_id")
ARTIFACT_ID = {
    "name": "artifact_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^(sha256:)?[0-9a-f]{64}$"},
}
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}
FLAG = {"enum": ["true", "false", "1", "0", "yes", "no"]}
STREAM_QUERY = [
    _query("last_event_id", {"type": "string", "pattern": "^[0-9]+$"}, "as Last-Event-ID"),
    _query("cancel_on_disconnect", FLAG, "cancel the task when this stream's client leaves"),
]
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
}

ADMISSION = {
    "type": "object",
    "required": ["task_id", "status", "events_url", "result_url"],
    "properties": {
        "task_id": {"type": "string"},
        "status": {"enum": ["queued", "delivered"]},
        "queue_position": {"type": ["integer", "null"]},
        "predicted_start_ms": {"type": ["integer", "null"]},
        "on_time_probability": {"type": ["number", "null"]},
        "budgets": {"anyOf": [{"$ref": "#/components/schemas/Budgets"}, {"type": "null"}]},
        "backoff_ms": {"type": "integer"},
        "events_url": {"type": "string"},
        "result_url": {"type": "string"},
    },
}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {
        "description": description or "OK",
        "content": {"application/json": {"schema": schema}},
    }


def _model(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


# what any route may answer: 400 (a header given twice or not text, an unknown query
# parameter), 401 and 403 (the token and origin checks), 405 (another method, with
# `Allow`), 414 and 431 (a request line or headers over the limits)
EVERY_ROUTE = (400, 401, 403, 405, 414, 431)


def _errors(*codes: int) -> dict[str, Any]:
    """The envelope for `codes`, and for what every route may answer (`EVERY_ROUTE`)."""
    every = sorted({*codes, *EVERY_ROUTE})
    return {str(c): _json(ERROR, "the error envelope") for c in every}


OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"]}},
}


def _openai(*codes: int) -> dict[str, Any]:
    """OpenAI's routes answer errors in OpenAI's shape; auth refusals keep the envelope."""
    every = sorted({*codes, *EVERY_ROUTE} - {401, 403})
    out = {str(c): _json(OPENAI_ERROR, "OpenAI's error shape") for c in every}
    return out | {"401": _json(OBJECT, "refused"), "403": _json(OBJECT, "refused")}


COMPLETION = {
    "200": {
        "description": "a completion, or its chunks",
        "content": {
            "application/json": {"schema": OBJECT},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
    **_openai(400, 404, 409, 413, 415, 429, 503),
}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


SSE = {
    "description": "Server-Sent Events",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
ENDED = {"description": "resumed at or past the end: nothing more will come"}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/tasks": {
        "post": _op(
            "Deliver a task into the spool and wait for its admission",
            {"202": _json(ADMISSION), **_errors(400, 404, 409, 413, 415, 429, 503)},
            requestBody=_body(_model("TaskFile")),
        ),
    },
    "/v1/tasks/{task_id}": {
        "get": _op(
            "The task's result file (or `delivered` while it waits in the spool)",
            {
                "200": _json(OBJECT, "its result (schema Result), or `delivered`"),
                **_errors(400, 404, 500),
            },
            parameters=[TASK_ID],
        ),
    },
    "/v1/tasks/{task_id}/events": {
        "get": _op(
            "The task's event log as SSE; Last-Event-ID resumes",
            {"200": SSE, "204": ENDED, **_errors(400, 404)},
            parameters=[TASK_ID, LAST_EVENT_ID, *STREAM_QUERY],
        ),
    },
    "/v1/tasks/{task_id}/stream": {
        "get": _op(
            "The same stream under the digest's name",
            {"200": SSE, "204": ENDED, **_errors(400, 404)},
            parameters=[TASK_ID, LAST_EVENT_ID, *STREAM_QUERY],
        ),
    },
    "/v1/tasks/{task_id}/cancel": {
        "post": _op(
            "Request a cancel (idempotent)",
            {"200": _json(OBJECT), "202": _json(OBJECT), **_errors(400, 404, 500, 503)},
            parameters=[TASK_ID],
        ),
    },
    "/v1/sessions/{session_id}": {
        "get": _op(
            "A session's turns, tokens and TTL",
            {"200": _json(OBJECT), **_errors(400, 404)},
            parameters=[SESSION_ID],
        ),
        "delete": _op(
            "Forget a session",
            {"204": {"description": "gone"}, **_errors(400)},
            parameters=[SESSION_ID],
        ),
    },
    "/v1/capabilities": {
        "get": _op(
            "Pools, engines, contexts and live concurrency", {"200": _json(OBJECT), **_errors()}
        ),
    },
    "/v1/status": {
        "get": _op("status.json", {"200": _json(_model("StatusFile")), **_errors()}),
    },
    "/v1/status/events": {
        "get": _op("status.json as SSE whenever it changes", {"200": SSE, **_errors()}),
    },
    "/v1/pools": {"get": _op("The pools of status.json", {"200": _json(OBJECT), **_errors()})},
    "/v1/pools/{pool_id}/drain": {
        "post": _op(
            "Drain a pool's replicas and start none until a reload",
            {"200": _json(OBJECT), "202": _json(OBJECT), **_errors(400, 404, 413, 415)},
            parameters=[POOL_ID],
            requestBody=_body(OBJECT) | {"required": False},
        ),
    },
    "/v1/pools/{pool_id}/reload": {
        "post": _op(
            "Point a pool at another model by editing orch.yaml; rolled back when not Ready",
            {"200": _json(OBJECT), **_errors(400, 404, 409, 413, 415)},
            parameters=[POOL_ID],
            requestBody=_body(OBJECT),
        ),
    },
    "/v1/catalog/models": {
        "get": _op(
            "The models of orch.yaml with their files and verifications",
            {"200": _json(OBJECT), **_errors()},
        ),
    },
    "/v1/catalog/models/{model_id}": {
        "get": _op(
            "One model of the catalog",
            {"200": _json(OBJECT), **_errors(400, 404)},
            parameters=[MODEL_ID],
        ),
    },
    "/v1/catalog/models/{model_id}/verify": {
        "post": _op(
            "sha256 of the model file against its digest; a failure blocks admission",
            {"200": _json(OBJECT), **_errors(400, 404)},
            parameters=[MODEL_ID],
        ),
    },
    "/v1/artifacts": {
        "post": _op(
            "Store an artifact (content-addressed, idempotent)",
            {"200": _json(OBJECT), "201": _json(OBJECT), **_errors(400, 413, 415)},
            requestBody=_body(_model("Artifact")),
        ),
        "get": _op(
            "Stored artifacts",
            {"200": _json(OBJECT), **_errors(400)},
            parameters=[
                _query("kind", {"type": "string"}),
                _query("limit", {"type": "string", "pattern": "^[0-9]+$"}),
                {**_query("tag", {"type": "string"}), "explode": True},
            ],
        ),
    },
    "/v1/artifacts/{artifact_id}": {
        "get": _op(
            "One artifact",
            {
                "200": _json(OBJECT),
                "304": {"description": "unchanged: If-None-Match named its ETag"},
                **_errors(400, 404),
            },
            parameters=[ARTIFACT_ID, IF_NONE_MATCH],
        ),
    },
    "/v1/models": {
        "get": _op("OpenAI: the models of orch.yaml", {"200": _json(OBJECT), **_openai()}),
    },
    "/v1/models/{model_id}": {
        "get": _op(
            "OpenAI: one model", {"200": _json(OBJECT), **_openai(404)}, parameters=[MODEL_ID]
        ),
    },
    "/v1/chat/completions": {
        "post": _op(
            "OpenAI: a chat turn as a task (stream: true gives SSE chunks and [DONE])",
            COMPLETION,
            requestBody=_body(OBJECT),
        ),
    },
    "/v1/completions": {
        "post": _op(
            "OpenAI: a text completion as a task",
            COMPLETION,
            requestBody=_body(OBJECT),
        ),
    },
    "/metrics": {
        "get": _op(
            "Prometheus text (OpenMetrics when the scraper's Accept asks for it)",
            {
                "200": {
                    "description": "metrics",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                **_errors(),
            },
        ),
    },
    "/": {
        "get": _op(
            "The status page",
            {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                },
                **_errors(),
            },
        ),
    },
    "/openapi.yaml": {
        "get": _op(
            "This document",
            {
                "200": {
                    "description": "YAML",
                    "content": {"application/yaml": {"schema": {"type": "object"}}},
                },
                **_errors(),
            },
        ),
    },
}


def document() -> dict[str, Any]:
    _, defs = models_json_schema(
        [
            (tasks.TaskFile, "validation"),
            (results.Result, "serialization"),
            (errors.ErrorEnvelope, "serialization"),
            (statusfile.StatusFile, "serialization"),
            (artifacts.Artifact, "validation"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": api.API_VERSION},
        "paths": PATHS,
        "components": {"schemas": defs["$defs"]},
    }


def render() -> str:
    return yaml.safe_dump(document(), sort_keys=True, allow_unicode=True)


def write(folder: Path) -> Path:
    path = folder / NAME
    path.write_text(render(), encoding="utf-8")
    return path


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, HEAD left out (aiohttp adds it)."""
    return {
        (r.method.lower(), r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method not in ("HEAD", "*")
    }


def described() -> set[tuple[str, str]]:
    return {(method, path) for path, ops in PATHS.items() for method in ops}


async def serve(request: web.Request) -> web.StreamResponse:
    return web.Response(text=render(), content_type="application/yaml")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.yaml", serve)
