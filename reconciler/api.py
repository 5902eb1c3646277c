"""The HTTP face: an aiohttp server in the daemon's own event loop, on `server.bind`.

The daemon calls `start(backend, ...)` after recovery and `stop` when it stops. The files stay
the truth: a POSTed task is delivered into the spool exactly like `orchctl submit`, cancels are
written to spool/cancel/ like `orchctl cancel`, and results and events are read from the files
the loop writes, so a daemon crash loses nothing an answer acknowledged. Every response carries
`X-Correlation-Id` (echoed or generated); every 4xx/5xx carries the error envelope; no request
can crash the server (an unexpected error is a 500 INTERNAL envelope and a log line).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import logging
import re
import urllib.parse
import uuid
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import HttpVersion11, http_exceptions, web, web_protocol, web_server
from aiohttp_sse import EventSourceResponse, sse_response

from reconciler import api_auth, configuring, fanout, logs, metrics
from state import desired, errors, ids, parsing, results, sessions, spool, statusfile
from state.errors import ErrorCode
from state.results import Result as TaskResult  # (Backend has a field named `results`)

log = logs.get("http")

MAX_BODY_BYTES = 1024 * 1024
API_VERSION = "1.0.0"
_CORRELATION = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def correlation_of(request: web.Request, given: Any) -> str:
    """The correlation id of a request whose body names one (`given`, None when it does
    not): the body's, when it is a valid id and X-Correlation-Id says no other (then
    answered in that header too); the request's own otherwise. Raises ApiError for an
    invalid one or one that differs from the header's."""
    if given is None:
        return str(request[CORRELATION])
    if not isinstance(given, str) or not _CORRELATION.match(given):
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "correlation_id: 1 to 128 letters, digits, '.', '_', ':' and '-'",
            hint="send a correlation id of those characters, or leave it out",
            param="correlation_id",
        )
    header = request.headers.get("X-Correlation-Id")
    # an invalid header was not taken (the request got an id of its own): the body's wins
    if header is not None and _CORRELATION.match(header) and header != given:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "correlation_id: the body says one id and X-Correlation-Id another",
            hint="give the correlation id once, in the body or in X-Correlation-Id",
            param="correlation_id",
        )
    request[CORRELATION] = given
    return given


BACKEND: web.AppKey[Backend] = web.AppKey("backend")
AUTH: web.AppKey[api_auth.Auth] = web.AppKey("auth")
CORRELATION: web.RequestKey[str] = web.RequestKey("correlation_id")
IDENTITY: web.RequestKey[str] = web.RequestKey("identity")
# set where the rest of the connection cannot be trusted: the answer closes it
_CLOSE: web.RequestKey[bool] = web.RequestKey("close_connection")
HOSTS: web.AppKey[frozenset[str]] = web.AppKey("hosts")


@dataclass(frozen=True)
class Backend:
    """What the handlers read and write: the daemon's files and a few live views."""

    spool: spool.Spool
    results: results.ResultStore
    sessions: sessions.SessionStore
    hub: fanout.Hub
    config: configuring.AppliedConfig
    status: Callable[[], statusfile.StatusFile]
    live: Callable[[ids.TaskId], bool]  # queued or running in this daemon
    wake: Callable[[], None]
    metrics: metrics.Metrics  # the daemon's Prometheus series (GET /metrics)
    queue_position: Callable[[ids.TaskId], int | None] = lambda task_id: None  # None: not queued
    # returns once every task write made so far is on disk (a frame is published before the
    # group commit that writes its result: tasking.Books.settled)
    settled: Callable[[], Awaitable[None]] = lambda: asyncio.sleep(0)
    # the daemon is stopping: it takes no new task (its loop admits nothing more)
    stopping: Callable[[], bool] = lambda: False
    # set as the API closes (`Server.stop`): a stream still open ends in its own words within
    # WATCH_S, before aiohttp's shutdown cuts the connections it has not ended
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    # models whose file failed its digest check → why: admission refuses their tasks
    blocked: Callable[[], Mapping[str, str]] = lambda: {}
    # a live task's result as the daemon holds it (None: not live): answered when its file
    # is unreadable or gone (deleted by hand, a folder put there)
    live_result: Callable[[ids.TaskId], TaskResult | None] = lambda task_id: None
    # what a new turn of a session may ask for under its token budget (None: no budget)
    session_tokens_left: Callable[[str], int | None] = lambda session_id: None


class ApiError(Exception):
    """Raised by a handler: becomes the error envelope with the code's HTTP status."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        hint: str | None = None,
        retry_after_ms: int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.envelope = errors.envelope(code, message, hint=hint, retry_after_ms=retry_after_ms)
        self.param = param  # the request field at fault, for shapes that name it (OpenAI's)


def error_response(envelope: errors.ErrorEnvelope, *, status: int | None = None) -> web.Response:
    """The envelope as an HTTP answer; 429s carry Retry-After (whole seconds, ≥ 1) and
    X-Backoff-Ms so standard clients back off."""
    code = status or errors.CODES[envelope.code].http_status or 500
    response = web.json_response(envelope.model_dump(mode="json"), status=code)
    if code in (429, 503) and envelope.retry_after_ms is not None:
        response.headers["Retry-After"] = str(max(1, -(-envelope.retry_after_ms // 1000)))
        response.headers["X-Backoff-Ms"] = str(envelope.retry_after_ms)
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How a route answers errors when not with the envelope: (envelope, status, param) -> answer.
ErrorShape = Callable[[errors.ErrorEnvelope, int | None, str | None], web.Response]
ERROR_SHAPES: web.AppKey[dict[web.AbstractResource, ErrorShape]] = web.AppKey("error_shapes")
# paths no route matches, by prefix: the shape their errors (404) take
PREFIX_SHAPES: web.AppKey[list[tuple[tuple[str, ...], ErrorShape]]] = web.AppKey("prefix_shapes")
# per route: the query parameters it takes, once and repeatable (`takes_query`); None: any
QUERY: web.AppKey[dict[web.AbstractResource, tuple[tuple[str, ...], tuple[str, ...]] | None]] = (
    web.AppKey("query_parameters")
)


def shape_errors(app: web.Application, route: web.AbstractRoute, shape: ErrorShape) -> None:
    """Answer every error of `route` (auth, body, handler) with `shape` instead of the
    envelope: the OpenAI routes use it so standard clients read their errors."""
    assert route.resource is not None
    app[ERROR_SHAPES][route.resource] = shape


def takes_query(
    app: web.Application,
    route: web.AbstractRoute,
    *,
    once: tuple[str, ...] = (),
    many: tuple[str, ...] = (),
    any_names: bool = False,
) -> None:
    """The query parameters `route` takes (`once`: at most once; `many`: repeatable); any
    other is refused (400, naming it) before its handler runs. A route that declares none
    takes none. `any_names`: it ignores its query string (OpenAI's routes, as OpenAI's API
    does; the status page)."""
    if route.resource is not None:
        app[QUERY][route.resource] = None if any_names else (once, many)


def shape_prefixes(app: web.Application, prefixes: tuple[str, ...], shape: ErrorShape) -> None:
    """Answer errors of paths under `prefixes` that no route matches with `shape`."""
    app[PREFIX_SHAPES].append((prefixes, shape))


def _error_answer(
    request: web.Request,
    envelope: errors.ErrorEnvelope,
    *,
    status: int | None = None,
    param: str | None = None,
) -> web.Response:
    resource = request.match_info.route.resource
    shapes = request.app[ERROR_SHAPES]
    if resource is None:  # a wrong method (405): the resource the path names, if shaped
        resource = next((r for r in shapes if r.get_info().get("path") == request.path), None)
    shape = shapes.get(resource) if resource is not None else None
    if shape is None and resource is None:
        shape = next(
            (f for prefixes, f in request.app[PREFIX_SHAPES] if request.path.startswith(prefixes)),
            None,
        )
    if shape is not None:
        return shape(envelope, status, param)
    return error_response(envelope, status=status)


@web.middleware
async def _correlate(request: web.Request, handler: Handler) -> web.StreamResponse:
    given = request.headers.get("X-Correlation-Id", "")
    cid = given if _CORRELATION.match(given) else str(uuid.uuid4())
    request[CORRELATION] = cid
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error_answer(request, exc.envelope, param=exc.param)
    except web.HTTPException as exc:
        response = _http_error(request, exc)
    except ConnectionResetError:  # the client went away mid-answer: nobody to tell
        logs.emit(
            log,
            "http.client_gone",
            f"{request.method} {request.path}: the client closed the connection first.",
            correlation_id=cid,
        )
        return web.Response(status=499)  # never sent: aiohttp drops it on the closed socket
    except Exception as exc:  # never let one request take the server down
        logs.emit(
            log,
            "http.internal",
            f"{request.method} {request.path} failed: {type(exc).__name__}: {exc}",
            level=40,
            correlation_id=cid,
        )
        response = _error_answer(
            request,
            errors.envelope(ErrorCode.INTERNAL, f"internal error while serving {request.path}"),
        )
    if not response.prepared:  # (a task's body may have named the id: `correlation_of`)
        response.headers["X-Correlation-Id"] = request[CORRELATION]
        if request.get(_CLOSE):
            response.force_close()
        if response.status == 401:  # RFC 9110: say which scheme would be accepted
            response.headers.setdefault("WWW-Authenticate", 'Bearer realm="llama-orch"')
    return response


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    code = {
        404: ErrorCode.NOT_FOUND,
        405: ErrorCode.METHOD_NOT_ALLOWED,
        413: ErrorCode.PAYLOAD_TOO_LARGE,
        415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    }.get(exc.status, ErrorCode.INVALID_PARAMS if exc.status < 500 else ErrorCode.INTERNAL)
    text = exc.text or exc.reason
    hint = "send the whole body right after the headers" if exc.status == 408 else None
    if exc.status == 404 and request.match_info.route.resource is None:  # no route: say which
        text = f"no such path: {request.method} {logs.writable(request.path)[:200]}"
        hint = "GET /openapi.yaml lists every route (no trailing slash)"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        text = f"{exc.method} is not allowed on {logs.writable(request.path)[:200]}"
        hint = f"use {allowed} (GET /openapi.yaml lists every route and its methods)"
    response = _error_answer(request, errors.envelope(code, text, hint=hint), status=exc.status)
    if isinstance(exc, web.HTTPMethodNotAllowed):
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    return response


# the request headers the daemon reads that hold one value: given twice, which one counts
# would be a guess (a second Authorization or Last-Event-ID was ignored without a word)
_SINGLE_HEADERS = (
    "Host",
    "Authorization",
    "Content-Type",
    "Content-Encoding",
    "Expect",
    "Last-Event-ID",
    "Origin",
    "Sec-Fetch-Site",
    "X-Correlation-Id",
    "X-Session-Id",
)
# and those it reads, quotes or compares as text (a token that is not UTF-8 is the token
# check's to refuse: 401)
_TEXT_HEADERS = (*(h for h in _SINGLE_HEADERS if h != "Authorization"), "If-None-Match")


@web.middleware
async def _headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a header the daemon reads that is given twice, or whose value is not UTF-8
    text (aiohttp hands such bytes on as lone surrogates: quoted back in an error, they make
    a body strict JSON parsers refuse; compared, they raised)."""
    for name in _SINGLE_HEADERS:
        values = request.headers.getall(name, [])
        if len(values) > 1:
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                f"the request has {len(values)} {name} headers; it may be sent once, and "
                "none of them was used",
                hint=f"send {name} once",
            )
    for name in _TEXT_HEADERS:
        value = request.headers.get(name)
        if value is not None and not _encodable(value):
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                f"the {name} header is not UTF-8 text",
                hint=f"send {name} as ASCII (or UTF-8) text",
            )
    codings = request.headers.get("Transfer-Encoding")
    if codings is not None and [c.strip().lower() for c in codings.split(",")] != ["chunked"]:
        # the parser frames the chunks and hands on the rest as it came: a gzip transfer
        # coding would be read as if it were the body
        request[_CLOSE] = True
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"Transfer-Encoding {parsing.shortened(logs.writable(codings), 60)!r} is not "
            "accepted: only chunked",
            hint="send the body as it is (or chunked), and a compressed one with "
            "Content-Encoding: gzip",
        )
    if codings is not None and request.version < HttpVersion11:
        # RFC 9112 §6.1: HTTP/1.0 has no transfer codings, so where the message ends is in
        # doubt: answered, and the connection closed rather than read on from a guess
        request[_CLOSE] = True
    return await handler(request)


_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# query flags that give a read a side effect: another site's page must not set them either
# (an <img> or EventSource of a stream with ?cancel_on_disconnect=true cancels the task
# when the browser drops it)
_SIDE_EFFECT_FLAGS = ("cancel_on_disconnect",)


def _writes(request: web.Request) -> bool:
    """Whether the request changes something: a writing method, or a read asking for a side
    effect (any value but an explicit false counts: a bad one is refused later anyway)."""
    if request.method in _WRITES:
        return True
    return any(
        value.strip().lower() not in ("false", "0", "no", "")
        for flag in _SIDE_EFFECT_FLAGS
        for value in request.query.getall(flag, [])
    )


@web.middleware
async def _same_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Browsers are the one kind of client a loopback API must not trust blindly: a web page
    may POST to 127.0.0.1 (a cross-site request needs no token where loopback needs none), and
    a DNS-rebinding page may read it under its own host name. So a request must name an
    allowed host, and a write sent by another site's page (its Origin, or Sec-Fetch-Site) is
    refused. Programs (curl, SDKs, orchctl) send neither header and are unaffected."""
    allowed = request.app[HOSTS]
    if request.host and not _HOST_FORM.fullmatch(request.host):  # `a:1@evil.com`, `[::1]x`
        raise ApiError(
            ErrorCode.FORBIDDEN_ORIGIN,
            f"Host {ids.quoted(request.host)} is not a host name with an optional port",
            hint="use http://127.0.0.1:<port>/, or set server.public_url to the name you use",
        )
    host = _host_name(request)
    if allowed and host not in allowed:
        raise ApiError(
            ErrorCode.FORBIDDEN_ORIGIN,
            f"Host {request.host!r} is not a name this daemon serves "
            f"({', '.join(sorted(allowed))})",
            hint="use http://127.0.0.1:<port>/, or set server.public_url to the name you use",
        )
    if _writes(request):
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        # a browser without Sec-Fetch-* sends no Origin on a GET either (an <img> that cancels
        # on disconnect): its Referer, when it sends one, names the page
        referer = request.headers.get("Referer")
        # same-site: another origin of this site (a page on another port of this host)
        foreign = site in ("cross-site", "same-site") or (
            origin is not None and origin != "null" and _origin_host(origin) != request.host
        )
        if not foreign and origin is None and site is None and referer:
            foreign = urllib.parse.urlsplit(referer).netloc.lower() != request.host.lower()
            origin = referer if foreign else None
        if foreign or origin == "null":
            raise ApiError(
                ErrorCode.FORBIDDEN_ORIGIN,
                f"a {request.method} from the web page at {origin or 'another site'} is refused",
            )
    return await handler(request)


# a Host header: a name or address, IPv6 in brackets, then an optional port; nothing else
_HOST_FORM = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")


def _host_name(request: web.Request) -> str:
    """The host name a request names (its Host header without the port), lower case."""
    host = request.host or ""
    if host.startswith("["):  # [::1]:8080
        return host[1:].split("]", 1)[0].lower()
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).lower()


def _origin_host(origin: str) -> str:
    return origin.split("://", 1)[-1].rstrip("/")


def allowed_hosts(bind_host: str, public_url: str | None) -> frozenset[str]:
    """Host names requests may name: empty (any) when bound to a network address, where
    the token guards; else loopback names, the bound host and public_url's host."""
    if not api_auth.is_loopback_host(bind_host):
        return frozenset()
    names = {"127.0.0.1", "localhost", "::1", bind_host.strip("[]").lower()}
    if public_url:
        names.add(public_url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].lower())
    return frozenset(names)


# headers a reverse proxy adds: a request with one was relayed for a client elsewhere
FORWARDED_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    verdict = api_auth.check(
        request.app[AUTH], remote=request.remote, header=request.headers.get("Authorization")
    )
    if verdict.identity == "localhost" and not api_auth.is_loopback_host(_host_name(request)):
        # the loopback exemption is for programs on this machine, which name a loopback host;
        # a web page whose domain was pointed at this machine (DNS rebinding) names its own
        verdict = api_auth.Verdict(
            None,
            "MISSING_TOKEN",
            f"a request for Host {logs.writable(request.host)!r} needs "
            "`Authorization: Bearer <token>`: only requests to 127.0.0.1, ::1 or localhost "
            "skip the token",
        )
    forwarded = next((h for h in FORWARDED_HEADERS if h in request.headers), None)
    if verdict.identity == "localhost" and forwarded is not None:
        # relayed by a proxy on this machine for someone elsewhere: not a local caller
        verdict = api_auth.Verdict(
            None,
            "MISSING_TOKEN",
            f"a request relayed by a proxy ({forwarded}) comes from elsewhere, so it needs "
            "`Authorization: Bearer <token>`: only programs on this machine skip the token "
            "(set one with auth.token_env or auth.token_file: docs/security.md)",
        )
    if verdict.identity is None:
        logs.emit(
            log,
            "http.auth_failed",
            f"Refused {request.method} {request.path}: {verdict.code}.",
            level=30,
            correlation_id=request[CORRELATION],
            remote=request.remote,
        )
        code = ErrorCode.MISSING_TOKEN if verdict.code == "MISSING_TOKEN" else ErrorCode.BAD_TOKEN
        raise ApiError(code, verdict.message)
    request[IDENTITY] = verdict.identity
    return await handler(request)


@web.middleware
async def _query(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a query parameter the route does not take (a typo such as `?limt=5` would
    otherwise be ignored without a word), or one given twice that it takes once."""
    resource = request.match_info.route.resource
    if request.query and resource is not None:  # no route (404, 405): that error instead
        declared = request.app[QUERY].get(resource, ((), ()))
        if declared is not None:
            query_params(request, once=declared[0], many=declared[1])
    return await handler(request)


PING_S = 15.0  # the keep-alive comment of an idle event stream
WATCH_S = 0.5  # how often a stream with nothing to send checks that its client is still there


def client_gone(request: web.Request) -> bool:
    """Whether the client of `request` closed its connection (seen without a write)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def event_stream(
    request: web.Request, headers: dict[str, str]
) -> contextlib.AbstractAsyncContextManager[EventSourceResponse]:
    """An SSE response for `request` (aiohttp_sse's, as a context manager); raises
    ConnectionResetError (answered as a client gone, 499, one log line) when its client left
    before the stream began: aiohttp_sse asserts a transport, and a request the daemon read
    while held up (stopped, busy) whose client then gave up was a 500 INTERNAL in the log."""
    if client_gone(request):
        raise ConnectionResetError("the client closed the connection first")
    return sse_response(request, headers=headers, ping_interval=PING_S)


def stopping_envelope() -> errors.ErrorEnvelope:
    """The error an OpenAI request still waiting or streaming is ended with as the daemon
    stops (its task is canceled: nobody would read what it wrote after the restart)."""
    return errors.envelope(
        ErrorCode.DAEMON_STOPPING,
        "the daemon is stopping before this request's task finished; the task is canceled",
        hint="send the request again once the daemon is back",
        retry_after_ms=STOPPING_RETRY_MS,
    )


STOPPING_RETRY_MS = 5000  # a restart takes a few seconds


def stream_head(headers: dict[str, str]) -> web.Response:
    """The answer to HEAD on an SSE route: the stream's headers, no body (a stream is only
    sent to GET)."""
    return web.Response(status=200, headers={**headers, "Content-Type": "text/event-stream"})


def query_params(
    request: web.Request, *, once: tuple[str, ...] = (), many: tuple[str, ...] = ()
) -> None:
    """Refuse (400, naming it) a query parameter the route does not take, with the name it
    was probably meant to be, and one of `once` given twice: a typo such as
    `?cancel_on_disconect=true` would otherwise be silently ignored."""
    known = once + many
    for name in request.query:
        if name not in known:
            shown = parsing.shortened(logs.writable(name), 40)
            close = difflib.get_close_matches(name[:80], known, n=1, cutoff=0.6)
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                f"?{shown}: this route takes no such query parameter"
                + (f" (did you mean {close[0]}?)" if close else ""),
                hint=f"its parameters: {', '.join(known)}" if known else "send none",
                param=name,
            )
    for name in once:
        if len(request.query.getall(name, [])) > 1:
            raise ApiError(
                ErrorCode.INVALID_PARAMS,
                f"?{name} is given more than once",
                hint=f"give ?{name}= once",
                param=name,
            )


def query_flag(request: web.Request, name: str) -> bool:
    """A yes/no query parameter: true/false, 1/0, yes/no in any case; absent is false;
    anything else is a 400 naming it."""
    given = request.query.getall(name, [])
    if not given:
        return False
    value = given[-1].strip().lower()
    if len(given) > 1 or value not in _FLAGS:
        shown = parsing.shortened(logs.writable(",".join(given)), 40)
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"?{name}={shown}: give it once, as true or false",
            hint=f"?{name}=true",
            param=name,
        )
    return _FLAGS[value]


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


async def no_body_fields(request: web.Request) -> None:
    """For a route that takes nothing in its body: none, or `{}`. Any other body is held to
    what every body is (`read_json`: 415, 413, 400 for malformed JSON), then refused for
    the fields it names, never silently ignored."""
    if not request.can_read_body:
        return
    body = await read_json(request)
    if body == {}:
        return
    if isinstance(body, dict):
        named = ", ".join(ids.quoted(str(key)) for key in list(body)[:5])
        message = f"this route takes no fields in its body, and was given {named}"
    else:
        message = "the body must be a JSON object"
    raise ApiError(
        ErrorCode.INVALID_PARAMS,
        message,
        hint="send no body (or {}); GET /openapi.yaml lists what each route takes",
    )


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: 415 for another content type, 413 over the limit, 400 with
    the line and column for malformed JSON. The body is held to the bounds and checks of a
    task file (`parsing.parse_json_document`: nesting, value count, a key given twice, a
    number too long to convert), and to text that is UTF-8 all through (no lone surrogate
    escaped into a key or a value), so what is accepted here can be written to the spool."""
    if request.content_type != "application/json":
        given = request.headers.get("Content-Type", "").strip()
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"the body must be application/json, not {ids.quoted(given)}"
            if given
            else "the request has no Content-Type: send the body as application/json",
            hint="add the header `Content-Type: application/json`",
        )
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):  # read as UTF-8 all the same, it would be misread
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "the body must be UTF-8 JSON, not "
            f"charset={parsing.shortened(logs.writable(charset), 40)}",
            hint="send the body in UTF-8 (JSON's one encoding), with charset=utf-8 or no charset",
        )
    coding = request.headers.get("Content-Encoding", "").strip().lower()
    if coding not in _DECODED_CODINGS:
        raise ApiError(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            f"Content-Encoding {parsing.shortened(logs.writable(coding), 40)!r} is not "
            "accepted: the body would be read as something it is not",
            hint=_CODINGS_HINT,
        )
    try:
        # client_max_size makes aiohttp answer 413 beyond the limit; a body sent a byte at a
        # time must not hold its connection and handler for ever
        raw = await asyncio.wait_for(request.read(), BODY_READ_S)
    except TimeoutError:
        request[_CLOSE] = True
        raise web.HTTPRequestTimeout(
            text=f"the body did not arrive within {BODY_READ_S:g} s "
            f"({request.content_length or 'no'} bytes announced)"
        ) from None
    except web.RequestPayloadError:
        # the body is not what its Content-Encoding says (or it was cut): nothing of it can
        # be trusted, nor where the next request on this connection would start
        request[_CLOSE] = True  # (aiohttp, reading past it after the answer, logs the
        # error, which _ClientFault makes one warning line)
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            "the body could not be read (it ended before its Content-Length, or its chunks "
            "were malformed)",
            hint="send the whole body, as many bytes as Content-Length says",
        ) from None
    if coding not in ("", "identity"):
        raw = _decoded(raw, coding)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"the body is not UTF-8 (byte {exc.start})",
            hint="send the JSON as UTF-8 text (not UTF-16, not Latin-1)",
        ) from None
    data, _, problems = parsing.parse_json_document(text, "request body", tree=False)
    if problems:
        first = problems[0]
        where = "".join(f":{n}" for n in (first.line, first.column) if n is not None)
        field = f"{first.field}: " if first.field else ""
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"request body{where}: {field}{first.message}",
            hint=first.hint or "send one JSON object",
            param=first.field,
        )
    # text decoded from UTF-8 holds no surrogate: only a JSON escape can bring one in
    lone = _lone_surrogate(data) if _SURROGATE_ESCAPE.search(text) else None
    if lone is not None:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"request body: {lone or 'the body'} holds an escaped lone surrogate (\\ud800 to "
            "\\udfff without its pair), which is not text",
            hint="escape characters outside the BMP as a surrogate pair, or send them as UTF-8",
            param=lone or None,
        )
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
BODY_READ_S = 30.0  # the most a request body may take to arrive (1 MiB at most)
# a connection waiting for a request (none yet, headers half sent, or idle after an answer)
# is closed this long after it opened or its last answer (aiohttp's default is an hour: each
# silent or trickling client held a descriptor that long); a stream being answered is not
KEEPALIVE_S = 75.0
# the codings a body may come in: decoded here (`_decoded`), not by aiohttp's parser, which
# took a gzip body cut short as whole and answered a deflate one cut short as a coding it
# cannot decode; any other is refused (415) rather than read as if it were plain
_CODINGS_HINT = "send the body uncompressed (no Content-Encoding), or as one of gzip, deflate"
_DECODED_CODINGS = frozenset({"", "identity", "gzip", "deflate"})


def _decoded(raw: bytes, coding: str) -> bytes:
    """The body `raw` sent with Content-Encoding `coding` (gzip, its members one after
    another, or deflate: zlib's format or a raw stream, as clients send both), decoded
    whole: 400 where it is not that coding or was cut short, 413 where it decodes to over
    MAX_BODY_BYTES."""
    gzip = coding == "gzip"
    # deflate is zlib's format (RFC 1950: its first byte names method 8), or a raw stream
    wbits = 31 if gzip else (15 if raw[:1] and raw[0] & 0x0F == 8 else -15)
    out = bytearray()
    rest = raw
    try:
        while True:
            decoder = zlib.decompressobj(wbits)
            out += decoder.decompress(rest, MAX_BODY_BYTES + 1 - len(out))
            if len(out) > MAX_BODY_BYTES:
                raise ApiError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"the body decompresses to over {MAX_BODY_BYTES} bytes, the most accepted",
                    hint="send a smaller body",
                )
            if not decoder.eof:
                raise zlib.error("the body ends before the compressed stream does")
            rest = decoder.unused_data
            if not (gzip and rest):  # gzip: the next member; deflate: one stream only
                break
        if rest:
            raise zlib.error(f"{len(rest)} bytes follow the stream's end")
    except zlib.error as exc:
        raise ApiError(
            ErrorCode.INVALID_PARAMS,
            f"the body could not be read as Content-Encoding {coding} ({exc}): it is not "
            f"{coding} data, or it was cut short",
            hint="send the body uncompressed (no Content-Encoding), or compressed whole as "
            "the header says",
        ) from None
    return bytes(out)


def _lone_surrogate(data: Any, path: str = "") -> str | None:
    """The dotted path of the first key or string holding a lone surrogate, "" for the body
    itself; None when there is none (the body is within MAX_DEPTH: the recursion is bounded)."""
    if isinstance(data, str):
        return None if data.isascii() or _encodable(data) else path
    if isinstance(data, list):
        for i, item in enumerate(data):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(data, dict):
        for key, value in data.items():
            name = parsing.shortened(logs.writable(key), 60)  # shown in the answer: text only
            here = f"{path}.{name}" if path else name
            if not _encodable(key):
                return here
            found = _lone_surrogate(value, here)
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    """Whether `text` is UTF-8 text (aiohttp decodes other header bytes to lone surrogates,
    and a JSON escape can bring one into a body)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _request_line(exc: BaseException, text: str) -> bool:
    """Whether a LineTooLong is about the request line: aiohttp's Python parser gives the
    line (a method, then the target); its C parser gives only the target, from its URL
    callback."""
    if re.match(r"[A-Z]+ \S", text):
        return True
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name.endswith("cb_on_url"):
            return True
        tb = tb.tb_next
    return False


def _refusal(exc: http_exceptions.HttpProcessingError, status: int) -> tuple[int, str, str]:
    """(status, message, hint) for a request aiohttp's parser refused. Never the bytes it
    refused: they may hold a header's value, such as the API token."""
    if isinstance(exc, http_exceptions.LineTooLong):
        line, limit = (*exc.args, "", "")[:2]
        text = line.decode("latin-1") if isinstance(line, (bytes, bytearray)) else str(line)
        if _request_line(exc, text):
            return 414, f"the request line is over {limit} bytes", "shorten the URL"
        return (
            431,
            f"a header line is over {limit} bytes",
            "send each header in under 8 KiB (and fewer, smaller headers in all)",
        )
    if exc.message.startswith("Too many headers"):  # aiohttp's limit, 128 (a plain 400)
        return 431, "the request has too many header lines", "send at most 128 headers"
    reason = exc.message.split(":", 1)[0].strip().rstrip(".") or type(exc).__name__
    return (
        status if 400 <= status < 500 else 400,
        f"the HTTP request could not be read: {parsing.shortened(logs.writable(reason), 120)}",
        "send a well-formed HTTP/1.1 request: each header a `Name: value` line without "
        "control characters or bare line feeds",
    )


class _ClientFault(logging.Filter):
    """A request aiohttp's parser refused (bad framing, a bad header) is the client's fault:
    one warning line naming it, without the server's traceback or the refused bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError):
            # a body that was not read (the route takes none) and cannot be: aiohttp, reading
            # past it after the answer, closes the connection
            cause = exc.__cause__
            exc = cause if isinstance(cause, http_exceptions.HttpProcessingError) else None
            if exc is None:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
                record.msg = "Closed a connection whose request body could not be read."
                record.args, record.exc_info, record.exc_text = None, None, None
                record.orch_event = "http.malformed_request"
        if isinstance(exc, http_exceptions.HttpProcessingError):
            status, message, _ = _refusal(exc, exc.code)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = f"Refused a malformed HTTP request ({status}): {message}"
            record.args = None
            record.exc_info, record.exc_text = None, None
            record.orch_event = "http.malformed_request"
        return True


class _Handler(web_protocol.RequestHandler):
    """aiohttp's connection handler, answering a request its parser refused with the error
    envelope and X-Correlation-Id, as every other error, not plain text quoting the bytes."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        answer = super().handle_error(request, status, exc, message)  # logs; checks the socket
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return answer
        code, text, hint = _refusal(exc, status)
        kind = ErrorCode.UNSUPPORTED_MEDIA_TYPE if code == 415 else ErrorCode.INVALID_PARAMS
        envelope = errors.envelope(kind, text, hint=hint)
        shape = self._shape(_refused_target(exc))
        answer = shape(envelope, code, None) if shape else error_response(envelope, status=code)
        return _closing(answer)

    def _shape(self, target: str | None) -> ErrorShape | None:
        """The error shape of the routes under `target` (OpenAI's under its prefixes)."""
        app = getattr(self._manager.request_handler, "__self__", None) if self._manager else None
        if target is None or not isinstance(app, web.Application):
            return None
        path = target.split("?", 1)[0]
        return next((f for prefixes, f in app[PREFIX_SHAPES] if path.startswith(prefixes)), None)


def _refused_target(exc: BaseException) -> str | None:
    """The request target of a request line refused as too long (what the parser kept of
    it: enough to tell its route's prefix); None for any other refusal, which comes after
    the request line is gone."""
    if not isinstance(exc, http_exceptions.LineTooLong):
        return None
    line = exc.args[0] if exc.args else ""
    text = line.decode("latin-1") if isinstance(line, (bytes, bytearray)) else str(line)
    if not _request_line(exc, text):
        return None
    method_and_target = re.match(r"[A-Z]+ (\S+)", text)
    return method_and_target.group(1) if method_and_target else text


def _closing(response: web.Response) -> web.Response:
    """An error answered before the middlewares ran (the request's head only): a new
    correlation id, and the connection closed after it (a body may follow, unread)."""
    response.headers["X-Correlation-Id"] = str(uuid.uuid4())
    response.force_close()
    return response


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class _Runner(web.AppRunner):
    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, making _Handler connections
        return server


Routes = Callable[[web.Application], None]


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """The `Expect:` header, answered before the body is sent: a body announced over the
    limit is refused at once (413: the client need not upload it), an expectation other than
    100-continue is 417; both in the error envelope, as every error (aiohttp's own answer
    was plain text, and a 100 Continue for any size)."""
    expect = request.headers.get("Expect", "").strip().lower()
    if request.version != HttpVersion11 or not expect:
        return None
    status: int | None = None
    if expect != "100-continue":
        status = 417
        envelope = errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"Expect: {parsing.shortened(logs.writable(expect), 40)} is not supported",
            hint="send Expect: 100-continue, or no Expect header",
        )
    elif (request.content_length or 0) > MAX_BODY_BYTES:
        status = 413
        envelope = errors.envelope(
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the body would be {request.content_length} bytes; at most {MAX_BODY_BYTES} "
            "are accepted",
        )
    if status is None:
        refused = await _refused_at_gates(request)
        if refused is not None:  # no 100 Continue: a body the answer will not take
            refused.force_close()
            return refused
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
        return None
    return _closing(_error_answer(request, envelope, status=status))


# the middlewares every request passes before its body is read
_GATES = (_correlate, _headers, _same_origin, _authenticate)


async def _refused_at_gates(request: web.Request) -> web.StreamResponse | None:
    """The answer the host, origin and token checks give `request`, or None when it passes
    them: a body is invited (100 Continue) only from a client that may send it."""

    through = web.Response(status=204)  # never sent: it says the request got through

    async def passed(_: web.Request) -> web.StreamResponse:
        return through

    chain: Handler = passed
    for middleware in reversed(_GATES):
        chain = functools.partial(middleware, handler=chain)
    answer = await chain(request)
    return None if answer is through else answer


def make_app(
    backend: Backend,
    auth: api_auth.Auth,
    routes: list[Routes],
    hosts: frozenset[str] = frozenset(),
) -> web.Application:
    """The application: the middlewares here, the routes from the modules that add them."""
    app = web.Application(
        middlewares=[*_GATES, _query],
        client_max_size=MAX_BODY_BYTES,
    )
    app[BACKEND] = backend
    app[AUTH] = auth
    app[HOSTS] = hosts
    app[ERROR_SHAPES] = {}
    app[PREFIX_SHAPES] = []
    app[QUERY] = {}
    for add in routes:
        add(app)
    for resource in app.router.resources():
        for route in resource:
            # aiohttp takes an expect handler per route, and has no setting for all of them
            route._expect_handler = _expect
    return app


@dataclass
class Server:
    runner: web.AppRunner
    url: str
    auth: api_auth.Auth

    async def stop(self) -> None:
        self.runner.app[BACKEND].closing.set()
        await self.runner.cleanup()


def split_bind(bind: str) -> tuple[str, int]:
    problem = desired.bind_problem(bind)
    if problem is not None:
        raise errors.ConfigProblem(f"server.bind: {problem}")
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


LINGER_S = 1.0


async def start(backend: Backend, *, bind: str, base: Path, routes: list[Routes]) -> Server:
    """Serve on `bind` (port 0: any free port); the URL actually bound comes back."""
    host, port = split_bind(bind)
    state = backend.config.state
    assert state is not None
    auth = api_auth.load(state, base, bind_host=host)
    runner = _Runner(
        make_app(backend, auth, routes, allowed_hosts(host, state.server.public_url)),
        access_log=None,
        auto_decompress=False,  # bodies are decoded by read_json (`_decoded`)
        keepalive_timeout=KEEPALIVE_S,
        # after an answer that closes the connection (a 408, a 413 before the upload), what
        # the client still sends is read and dropped this long, so it is not reset before
        # it reads the answer; aiohttp's 10 s kept a client reading to the end waiting
        lingering_time=LINGER_S,
        handle_signals=False,
        shutdown_timeout=1.0,
    )
    for name in ("aiohttp.server", "aiohttp.web"):  # once per logger, however many servers
        target = logging.getLogger(name)
        if not any(isinstance(f, _ClientFault) for f in target.filters):
            target.addFilter(_ClientFault())
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise errors.ConfigProblem(
            f"server.bind {bind}: cannot listen ({exc.strerror or exc}); "
            "pick a free port in orch.yaml"
        ) from None
    bound = runner.addresses
    bound_port = int(bound[0][1]) if bound else port
    shown = f"[{host}]" if ":" in host else host
    return Server(runner, f"http://{shown}:{bound_port}", auth)
