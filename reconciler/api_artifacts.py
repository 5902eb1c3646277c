"""The artifact registry over HTTP (HME-022): POST /v1/artifacts, GET /v1/artifacts/{id} and a
listing by tag and kind. `api_routes.start` adds these routes with `routes(store)`.

Storing is idempotent: the id is the sha256 of the document's canonical JSON
(`state.artifacts`), so a second POST of the same document answers 200 with the first
record, a first one 201. Each answer carries a `url` a client elsewhere can fetch:
`server.public_url` from orch.yaml when set (the address the dev box reaches, e.g. through an
SSH tunnel), else the scheme and Host of the request. Files are read and written in a worker
thread: the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import time

import pydantic
from aiohttp import web

from reconciler import api, clocks, logs
from reconciler.api import BACKEND, ApiError
from state import artifacts, ids, loading
from state.errors import ErrorCode

log = logs.get("http")

STORE: web.AppKey[artifacts.ArtifactStore] = web.AppKey("artifacts")
LIST_LIMIT = 100  # the most refs one listing returns (and its default)


def routes(store: artifacts.ArtifactStore) -> api.Routes:
    def add_routes(app: web.Application) -> None:
        app[STORE] = store
        app.router.add_post("/v1/artifacts", post_artifact)
        api.takes_query(
            app,
            app.router.add_get("/v1/artifacts", list_artifacts),
            once=("kind", "limit"),
            many=("tag",),
        )
        app.router.add_get("/v1/artifacts/{artifact_id}", get_artifact)

    return add_routes


def ref(request: web.Request, record: artifacts.StoredArtifact) -> dict[str, object]:
    """What a client keeps of a stored artifact: its id, kind, digest, tags and URL."""
    return {
        "id": record.id,
        "kind": record.document.kind,
        "digest": record.id,
        "created_at": record.created_at,
        "size_bytes": record.size_bytes,
        "tags": list(record.document.tags),
        "parent": record.document.parent,
        "url": f"{_base_url(request)}/v1/artifacts/{record.id}",
    }


def _base_url(request: web.Request) -> str:
    state = request.app[BACKEND].config.state
    public = state.server.public_url if state is not None else None
    if public:
        return public.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _document(body: object) -> artifacts.Artifact:
    if not isinstance(body, dict):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "the body must be a JSON object (an artifact)",
            hint=_SHAPE,
        )
    try:
        return artifacts.Artifact.model_validate(body)
    except pydantic.ValidationError as exc:
        problems = loading.validation_errors(exc, artifacts.Artifact, None, "request body", body)
        top = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{top.field or 'body'}: {top.message}{more}",
            hint=top.hint or _SHAPE,
        ) from None


async def post_artifact(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    document = _document(await api.read_json(request))
    if document.parent is not None:
        parent_known = await asyncio.to_thread(store.exists, document.parent)
        if not parent_known:
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                f"parent: no artifact {document.parent} is stored here",
                hint="store the parent first, or leave parent out",
            )
    try:
        record, created = await asyncio.to_thread(
            store.put, document, created_at=clocks.rfc3339(time.time())
        )
    except artifacts.ArtifactProblem as exc:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            str(exc),
            hint="send a smaller document, with finite numbers and text that is UTF-8",
        ) from None
    except OSError as exc:  # the daemon's folder, not the request: say which and why
        where = exc.filename or store.root
        raise ApiError(
            ErrorCode.INTERNAL,
            f"could not store the artifact: {where}: {exc.strerror or exc}",
            hint="fix the folder paths.artifacts names (a folder the daemon may write to, "
            "with free space), then send it again",
        ) from None
    if created:
        logs.emit(
            log,
            "artifact.stored",
            f"Stored {record.document.kind} artifact {record.id} ({record.size_bytes} bytes) "
            f"from {request[api.IDENTITY]}.",
            artifact_id=record.id,
            kind=record.document.kind,
            correlation_id=request[api.CORRELATION],
        )
    answer = ref(request, record)
    response = web.json_response(answer, status=201 if created else 200)
    response.headers["Location"] = f"/v1/artifacts/{record.id}"
    return response


def _artifact_id(request: web.Request) -> str:
    given = request.match_info["artifact_id"]
    parsed = artifacts.parse_id(given)
    if parsed is None:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"{given[:80]!r} is not an artifact id",
            hint="artifact ids are sha256:<64 lowercase hex>, as POST /v1/artifacts returns",
        )
    return parsed


async def get_artifact(request: web.Request) -> web.StreamResponse:
    """The document as canonical JSON, so sha256(body) is the id; created_at in a header."""
    store = request.app[STORE]
    artifact_id = _artifact_id(request)
    record = await asyncio.to_thread(store.get, artifact_id)
    if record is None:
        raise ApiError(ErrorCode.NOT_FOUND, f"no artifact {artifact_id} is stored here")
    etag = f'"{record.id}"'
    headers = {"ETag": etag, "X-Artifact-Created-At": record.created_at}
    given = request.headers.get("If-None-Match", "")
    if given.strip() == "*" or etag in (t.strip().removeprefix("W/") for t in given.split(",")):
        return web.Response(status=304, headers=headers)  # the client has this document
    return web.Response(
        body=artifacts.canonical(record.document), content_type="application/json", headers=headers
    )


_KINDS = ("plan", "diff", "trace", "summary", "other")
_SHAPE = "send {kind: plan|diff|trace|summary|other, content: <any JSON>}"


async def list_artifacts(request: web.Request) -> web.StreamResponse:
    """Refs of stored artifacts, newest first, filtered by `tag` (repeatable: all must match)
    and `kind`. A scan of the folder: fine for the thousands a workstation keeps."""
    store = request.app[STORE]
    tags = set(request.query.getall("tag", []))
    kind = request.query.get("kind")
    if kind is not None and kind not in _KINDS:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"?kind={ids.quoted(kind)} is not an artifact kind",
            hint=f"one of: {', '.join(_KINDS)}",
            param="kind",
        )
    raw_limit = request.query.get("limit", str(LIST_LIMIT))
    # ASCII digits only, and few: int() takes '²' and '١', and refuses 4,301 digits
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6) or not (
        1 <= int(raw_limit) <= LIST_LIMIT
    ):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"?limit={ids.quoted(raw_limit)}: limit must be a whole number from 1 to {LIST_LIMIT}",
            hint=f"?limit={LIST_LIMIT}",
            param="limit",
        )
    limit = int(raw_limit)

    def scan() -> list[artifacts.StoredArtifact]:
        found = []
        for record in store.newest(kind=kind, tags=frozenset(tags)):
            found.append(record)
            if len(found) >= limit:
                break
        return found

    records = await asyncio.to_thread(scan)
    return web.json_response({"artifacts": [ref(request, r) for r in records]})
