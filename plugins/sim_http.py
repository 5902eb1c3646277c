"""The sim child's HTTP/1.1 over asyncio streams: just enough for llama-server's clients.

`plugins.sim_server` hands `serve_connection` to `asyncio.start_server`; `plugins.sim_protocol`
routes the parsed requests and answers through `send_json` and the event-stream helpers.

What it speaks: keep-alive (until `Connection: close`, or the route says close), bodies with a
Content-Length (a chunked request body is refused with 411), JSON answers with a length, and
Server-Sent Events in chunked transfer encoding. Errors are llama-server's body
`{"error": {"code", "message", "type"}}`. A malformed request is answered, then the connection
closes; a client that goes away just ends its connection.

Standard library only: the sim child runs without site-packages (`python -S`), so no aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    411: "Length Required",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# (method, path, body, reader, writer) -> keep the connection open afterwards?
Route = Callable[[str, str, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class HttpError(Exception):
    """An answer with an error status, in llama-server's error body."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.kind}}


async def serve_connection(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, route: Route
) -> None:
    """Answer the requests of one connection with `route` until either side closes it."""
    try:
        keep_alive = True
        while keep_alive:
            request = await read_request(reader)
            if request is None:
                break
            method, path, headers, body = request
            keep_alive = headers.get("connection", "").lower() != "close"
            try:
                keep_alive = await route(method, path, body, reader, writer) and keep_alive
            except HttpError as e:
                await send_json(writer, e.status, e.body())
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    except HttpError as e:  # a malformed request: answer and close
        with contextlib.suppress(ConnectionError):
            await send_json(writer, e.status, e.body())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    """(method, path without query, lower-cased headers, body), or None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise HttpError(400, "incomplete request head", "invalid_request_error") from e
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line", "invalid_request_error")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        raise HttpError(411, "chunked request bodies are not supported", "invalid_request_error")
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return parts[0], parts[1].split("?", 1)[0], headers, body


def parse_json(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object (empty means {}); 400 otherwise."""
    try:
        value = json.loads(body or b"{}")
    except ValueError as e:
        raise HttpError(400, f"invalid JSON: {e}", "invalid_request_error") from e
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object", "invalid_request_error")
    return value


async def send_json(writer: asyncio.StreamWriter, status: int, value: Any) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    writer.write(
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


def start_events(writer: asyncio.StreamWriter) -> None:
    """The head of a 200 event stream; `send_event` the frames, then `end_events`."""
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


async def send_event(writer: asyncio.StreamWriter, value: Any) -> None:
    """One `data:` event, in one chunk, drained so a slow client slows the stream."""
    data = b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def send_done(writer: asyncio.StreamWriter) -> None:
    """The `data: [DONE]` that ends an OpenAI-style stream."""
    data = b"data: [DONE]\n\n"
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def end_events(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()
