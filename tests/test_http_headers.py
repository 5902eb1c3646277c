"""Request headers the daemon reads, refused with a clear envelope when they are not what
they must be: bytes that are not UTF-8, one given twice, a resume id that is not digits, a
Content-Encoding it cannot decode. Sent on a raw socket: HTTP clients refuse to send most of
these. The daemon answers each and goes on serving."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.conftest import Workspace, config, task, wait_terminal

pytestmark = pytest.mark.slow

TOKEN = "feedfacefeedface1234"


async def _raw(base: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send one request (`head`: its request line and headers, without the blank line);
    its status and JSON body."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    length = f"Content-Length: {len(body)}\r\n".encode() if body else b""
    writer.write(head + b"\r\n" + length + b"\r\n" + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    size = int(answer.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    rest = await asyncio.wait_for(reader.readexactly(size), 10)
    writer.close()
    rest.decode("utf-8")  # strict: no lone surrogate escaped into the answer either
    return int(answer.split()[1]), json.loads(rest)


async def _daemon(workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TEST_ORCH_TOKEN", TOKEN)
    workspace.write_config(
        config(
            server={"bind": "127.0.0.1:0"},
            auth={"token_env": "TEST_ORCH_TOKEN", "optional_on_loopback": True},
        )
    )
    running = await serve()
    return str(running.daemon.server.url).rstrip("/")


def _get(path: str, *headers: bytes) -> bytes:
    return b"\r\n".join([f"GET {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers])


async def test_header_values_that_are_not_utf8_are_refused_naming_the_header(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await _daemon(workspace, serve, monkeypatch)
    status, body = await _raw(base, _get("/v1/capabilities", b"Authorization: Bearer \xff\xfe1"))
    assert (status, body["code"]) == (401, "BAD_TOKEN") and "UTF-8" in body["message"]
    for name in (b"Origin", b"X-Correlation-Id", b"Last-Event-ID", b"If-None-Match"):
        status, body = await _raw(base, _get("/v1/capabilities", name + b": a\xe9b"))
        assert (status, body["code"]) == (400, "INVALID_PARAMS"), (name, body)
        assert name.decode() in body["message"] and "UTF-8" in body["message"]
    post = b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
    raw_task = json.dumps(task("h1")).encode()
    status, body = await _raw(base, post + b"\r\nX-Session-Id: s\xff1", raw_task)
    assert (status, body["code"]) == (400, "INVALID_PARAMS") and "X-Session-Id" in body["message"]
    status, body = await _raw(base, post, raw_task)  # and the daemon goes on
    assert status == 202
    assert (await wait_terminal(workspace, "h1"))["status"] == "succeeded"


async def test_a_header_read_once_given_twice_is_refused_not_half_taken(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await _daemon(workspace, serve, monkeypatch)
    good, bad = f"Authorization: Bearer {TOKEN}".encode(), b"Authorization: Bearer wrong0000"
    for first, second in ((good, bad), (bad, good)):
        status, body = await _raw(base, _get("/v1/capabilities", first, second))
        assert (status, body["code"]) == (400, "INVALID_PARAMS"), body
        assert "2 Authorization headers" in body["message"] and body["hint"]
        assert "none of them was used" in body["message"], body  # not "one is taken"
    status, body = await _raw(
        base, _get("/v1/tasks/x/events", b"Last-Event-ID: 1", b"Last-Event-ID: 9")
    )
    assert status == 400 and "Last-Event-ID" in body["message"]
    status, _ = await _raw(base, _get("/v1/capabilities", good))
    assert status == 200


@pytest.mark.parametrize("given", ["1_0", "+3", " -2", "٣", "3.0", "1e3"])
async def test_a_resume_id_must_be_plain_digits(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    base = await _daemon(workspace, serve, monkeypatch)
    workspace.submit("r1.task.yaml", task("r1", max_tokens=3))
    await wait_terminal(workspace, "r1")
    status, body = await _raw(base, _get("/v1/tasks/r1/events", f"Last-Event-ID: {given}".encode()))
    assert (status, body["code"]) == (400, "INVALID_PARAMS"), body
    assert "Last-Event-ID" in body["message"]


async def test_a_long_resume_id_is_still_a_number(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Digits of any length are an id (zeros in front are a number still): a 45-digit one
    was refused as 'not an event id'. One past the end is answered as the end (204)."""
    import aiohttp

    base = await _daemon(workspace, serve, monkeypatch)
    workspace.submit("r2.task.yaml", task("r2", max_tokens=3))
    await wait_terminal(workspace, "r2")
    async with aiohttp.ClientSession() as session:
        padded = {"Last-Event-ID": "0" * 5000 + "3"}  # past int()'s 4,300-digit limit too
        async with session.get(f"{base}/v1/tasks/r2/events", headers=padded) as r:
            assert r.status == 200
            ids = [
                ln.split(":", 1)[1].strip()
                for ln in (await r.text()).splitlines()
                if ln.startswith("id:")
            ]
            assert ids and int(ids[0]) == 4, ids
        huge = {"Last-Event-ID": "9" * 45}
        async with session.get(f"{base}/v1/tasks/r2/events", headers=huge) as r:
            assert r.status == 204
        # the header and the query name one id however it is written: not 'differ'
        both = {"Last-Event-ID": "003"}
        async with session.get(f"{base}/v1/tasks/r2/events?last_event_id=3", headers=both) as r:
            assert r.status == 200, await r.text()


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"compress"])
async def test_a_content_encoding_the_daemon_cannot_decode_is_415(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch, coding: bytes
) -> None:
    base = await _daemon(workspace, serve, monkeypatch)
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: " + coding
    )
    status, body = await _raw(base, head, json.dumps(task("c1")).encode())
    assert (status, body["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), body
    assert "gzip" in body["hint"]


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (b"application/json; charset=utf-16", 415),
        (b"application/json; charset=latin-1", 415),
        (b"application/json; charset=UTF-8", 202),
        (b'application/json; charset="utf-8"', 202),
    ],
)
async def test_a_body_in_a_charset_other_than_utf8_is_415_not_misread(
    workspace: Workspace,
    serve: Any,
    monkeypatch: pytest.MonkeyPatch,
    content_type: bytes,
    status: int,
) -> None:
    """JSON is UTF-8: a body said to be in another charset would be read as UTF-8 anyway,
    and a Latin-1 é become another character or a refusal that names no cause."""
    base = await _daemon(workspace, serve, monkeypatch)
    head = b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: " + content_type
    body = json.dumps(task("cs" + str(len(content_type)))).encode()
    answered, answer = await _raw(base, head, body)
    assert answered == status, answer
    if status == 415:
        assert answer["code"] == "UNSUPPORTED_MEDIA_TYPE" and "charset=" in answer["message"]


async def test_an_http_1_0_request_with_a_transfer_coding_closes_its_connection(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 9112 §6.1: HTTP/1.0 knows no Transfer-Encoding, so where such a message ends is
    in doubt: it is answered, then its connection closed, never read on for a next request."""
    base = await _daemon(workspace, serve, monkeypatch)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(task("h10", max_tokens=2)).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    first = (
        b"POST /v1/tasks HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    second = b"GET /v1/capabilities HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    writer.write(first + second)
    await writer.drain()
    everything = await asyncio.wait_for(reader.read(), 15)  # to EOF: the server closed
    writer.close()
    assert everything.count(b"HTTP/1.") == 1, everything[:300]


async def test_a_transfer_coding_other_than_chunked_is_refused_not_read_as_the_body(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Transfer-Encoding: gzip, chunked`: the parser framed the chunks and handed the
    gzip bytes on as the body, refused as 'not UTF-8 (byte 1)'. The coding is named."""
    import gzip

    base = await _daemon(workspace, serve, monkeypatch)
    data = gzip.compress(json.dumps(task("te1")).encode())
    chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: gzip, chunked"
    )
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"\r\n\r\n" + chunked)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # the connection is closed after it
    writer.close()
    head_bytes, _, rest = answer.partition(b"\r\n\r\n")
    body = json.loads(rest)
    assert int(head_bytes.split()[1]) == 400, answer
    assert "Transfer-Encoding 'gzip, chunked' is not accepted" in body["message"], body
    assert "Content-Encoding: gzip" in body["hint"], body
    assert workspace.result("te1") is None


async def test_too_many_headers_is_431_in_the_envelope(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = await _daemon(workspace, serve, monkeypatch)
    many = [f"X-Filler-{n}: {n}".encode() for n in range(200)]
    status, body = await _raw(base, _get("/v1/capabilities", *many))
    assert (status, body["code"]) == (431, "INVALID_PARAMS"), body
    assert "too many header lines" in body["message"] and "128" in body["hint"]
    status, _ = await _raw(base, _get("/v1/capabilities"))
    assert status == 200


async def test_probe_findings_on_bodies_and_headers_are_answered_as_users_expect(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Content-Type that cannot be parsed is named as sent (not as aiohttp's fallback); an
    invalid X-Correlation-Id, which is not taken, leaves a valid body correlation_id alone;
    a top_k past the engine's 32-bit int and a boolean json_schema are refused naming the
    field."""
    base = await _daemon(workspace, serve, monkeypatch)
    body = json.dumps(task("ct1")).encode()
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json, text/plain"
    )
    status, answer = await _raw(base, head, body)
    assert (status, answer["code"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), answer
    assert "not 'application/json, text/plain'" in answer["message"], answer
    head = (
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Correlation-Id: a b"
    )
    status, answer = await _raw(base, head, json.dumps(task("cor1", correlation_id="abc")).encode())
    assert status == 202, answer
    assert (await wait_terminal(workspace, "cor1"))["status"] == "succeeded"
    big = task("k1", sampling={"top_k": 2**31})
    head = b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
    status, answer = await _raw(base, head, json.dumps(big).encode())
    assert (status, answer["code"]) == (400, "INVALID_PARAMS") and "top_k" in answer["message"]
    chat = {
        "model": "m1",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}},
    }
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
    )
    status, answer = await _raw(base, head, json.dumps(chat).encode())
    assert status == 400, answer
    message = answer["error"]["message"] if "error" in answer else answer["message"]
    assert "json_schema.schema: must be a JSON object, not a boolean" in message, answer


async def test_a_refusal_before_the_upload_closes_the_connection_soon_after(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 413 answered to `Expect: 100-continue` says Connection: close; the socket then
    closes about a second later (aiohttp lingered 10 s, and a client reading to the end
    waited that long)."""
    import time

    base = await _daemon(workspace, serve, monkeypatch)
    host, port = base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n"
    )
    await writer.drain()
    began = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head, head
    await asyncio.wait_for(reader.read(), 10)  # to the end: the server closed
    assert time.monotonic() - began < 4
    writer.close()
