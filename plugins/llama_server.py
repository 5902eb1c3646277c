"""The protocol client for llama-server's HTTP subset, and the lifecycle steps that use it.

Both engine adapters talk to their child through this module: `llamacpp` to a real
`llama-server`, `sim` to `plugins.sim_server`, which speaks the same subset. Shapes follow the
recorded responses in /work/shared/fixtures/llama-server/:

- GET /health: 200 {"status":"ok"}; 503 {"error":{...,"message":"Loading model"}} while loading.
- GET /props: `build_info`, `total_slots`, `default_generation_settings.n_ctx` (per slot).
- GET /slots: one object per slot with `is_processing`.
- POST /completion with "stream": true: `data: {json}` lines; the last frame has "stop": true,
  `tokens_predicted`, `timings` and `stop_type` ("limit" when n_predict ran out).
- POST /v1/chat/completions for a chat request (`plugins.llama_chat`: body and chunks).

Every call opens its own short-lived aiohttp session, so nothing outlives the caller's task,
except the token streams of an adapter whose connections the daemon keeps (`engine_pool`).
Closing a `generate` iterator (``aclose()``) before its end closes its HTTP response: the
server sees the connection drop and stops generating for that request. The /completion body
and its stream's folding into Tokens and a Done are in `plugins.llama_completion`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from plugins import engine_pool, interfaces, llama_chat, llama_completion, processes

_NETWORK_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


def said(e: BaseException) -> str:
    """A network error in words a user reads (a status line, a task's error), never
    aiohttp's reprs of its exception classes."""
    if isinstance(e, aiohttp.ClientPayloadError):
        return "the answer stopped midway (the engine process may have died)"
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the engine closed the connection"
    if isinstance(e, (aiohttp.ClientConnectorError, ConnectionRefusedError)):
        return "the connection was refused (the engine is not listening)"
    if isinstance(e, ConnectionResetError):
        return "the connection was reset (the engine process may have died)"
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).split(":", 1)[0].strip()
    return text or type(e).__name__


class ProtocolError(interfaces.EngineStreamError):
    """The engine did not answer, or answered something this client cannot use."""


class RequestRejected(ProtocolError, interfaces.EngineRefused):
    """The engine refused the request with an HTTP error (e.g. 400 for a bad prompt)."""

    def __init__(self, status: int, message: str, kind: str = "") -> None:
        interfaces.EngineRefused.__init__(self, status, message)
        self.kind = kind


@dataclass(frozen=True)
class Health:
    ok: bool
    status: int | None  # None: no HTTP answer at all
    message: str


@dataclass(frozen=True)
class Props:
    build_info: str
    total_slots: int
    n_ctx: int | None  # per slot
    model_path: str | None


@dataclass(frozen=True)
class Completion:
    text: str
    done: interfaces.Done


def _rejected(status: int, body: bytes) -> RequestRejected:
    try:
        error = json.loads(body)["error"]
        return RequestRejected(status, str(error.get("message", "")), str(error.get("type", "")))
    except (ValueError, KeyError, TypeError, AttributeError):
        return RequestRejected(status, body.decode("utf-8", errors="replace")[:300])


def parse_line(line: bytes) -> dict[str, Any] | None:
    """One SSE line: the JSON object of a `data:` line, None for anything to skip."""
    line = line.rstrip(b"\r")
    field, sep, value = line.partition(b":")
    if not sep or field not in (b"data", b"error"):
        return None  # blank line, comment (": ping"), or a field this client does not use
    value = value.strip()
    if value == b"[DONE]":
        return None
    try:
        frame = json.loads(value)
    except ValueError as e:
        raise ProtocolError(f"bad stream frame: {line[:200]!r}") from e
    if not isinstance(frame, dict):
        raise ProtocolError(f"bad stream frame: {line[:200]!r}")
    if field == b"error" or "error" in frame:
        error = frame.get("error", frame)
        if isinstance(error, dict):
            raise RequestRejected(
                int(error.get("code", 500)),
                str(error.get("message", "")),
                str(error.get("type", "")),
            )
        raise RequestRejected(500, str(error))
    return frame


class Client:
    """One llama-server (or sim server) at `base_url`."""

    def __init__(self, base_url: str, *, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    async def _get(self, path: str) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.base_url + path) as resp,
        ):
            return resp.status, await resp.read()

    async def _get_json(self, path: str) -> Any:
        try:
            status, body = await self._get(path)
        except _NETWORK_ERRORS as e:
            raise ProtocolError(f"GET {path}: {said(e)}") from e
        if status != 200:
            raise _rejected(status, body)
        try:
            return json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"GET {path}: not JSON: {body[:200]!r}") from e

    async def health(self) -> Health:
        try:
            status, body = await self._get("/health")
        except _NETWORK_ERRORS as e:
            return Health(False, None, f"no answer: {said(e)}")
        if status == 200:
            return Health(True, status, "ok")
        return Health(False, status, _rejected(status, body).message or f"HTTP {status}")

    async def props(self) -> Props:
        data = await self._get_json("/props")
        try:
            settings = data.get("default_generation_settings") or {}
            return Props(
                build_info=str(data["build_info"]),
                total_slots=int(data["total_slots"]),
                n_ctx=settings.get("n_ctx"),
                model_path=data.get("model_path"),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ProtocolError(f"GET /props: unexpected shape: {e!r}") from e

    async def slots_busy(self) -> list[bool]:
        """`is_processing` of each slot, in slot order."""
        data = await self._get_json("/slots")
        try:
            return [bool(slot["is_processing"]) for slot in data]
        except (KeyError, TypeError) as e:
            raise ProtocolError(f"GET /slots: unexpected shape: {e!r}") from e

    async def complete(self, request: interfaces.GenerateRequest) -> Completion:
        """A non-streamed completion."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(
                    self.base_url + "/completion", json=llama_completion.body(request, stream=False)
                ) as resp,
            ):
                body = await resp.read()
        except _NETWORK_ERRORS as e:
            raise ProtocolError(f"POST /completion: {said(e)}") from e
        if resp.status != 200:
            raise _rejected(resp.status, body)
        try:
            data = json.loads(body)
            return Completion(str(data["content"]), llama_completion.done_from(data))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProtocolError(f"POST /completion: unexpected answer {body[:200]!r}") from e

    async def generate(
        self,
        request: interfaces.GenerateRequest,
        *,
        session: aiohttp.ClientSession | None = None,
        reading: set[aiohttp.ClientResponse] | None = None,
    ) -> AsyncIterator[interfaces.Token | interfaces.Done]:
        """Stream the completion (or, for a chat request, the chat answer): Tokens (indexed
        from 0), then one Done. Raises EngineStreamError on a dropped connection, an early end
        or a bad frame. With a pooled `session` (`engine_pool`) a stream that ends cleanly is
        read to its end and leaves its connection for the next; else it opens and closes its
        own. `reading` (the pool's set for this replica) holds the response while it is read,
        so stopping the replica ends the stream at once."""
        fold: llama_completion.Fold | llama_chat.Fold
        if request.chat is not None:
            path, body = llama_chat.PATH, llama_chat.chat_body(request, stream=True)
            fold = llama_chat.Fold()
        else:
            path, body = "/completion", llama_completion.body(request, stream=True)
            fold = llama_completion.Fold()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
        own = session is None
        try:
            async with contextlib.AsyncExitStack() as stack:
                if session is None:
                    session = await stack.enter_async_context(aiohttp.ClientSession())
                resp = await stack.enter_async_context(
                    await engine_pool.post(
                        session, self.base_url + path, body, timeout, retry=not own
                    )
                )
                kept = False
                if reading is not None:
                    reading.add(resp)
                try:
                    if resp.status != 200:
                        raise _rejected(resp.status, await resp.read())
                    async with contextlib.aclosing(_items(resp, fold)) as items:
                        async for item in items:
                            if isinstance(item, interfaces.Done):
                                kept = not own and await engine_pool.read_to_end(resp)
                                yield item
                                return
                            yield item
                    raise ProtocolError(
                        f"stream ended before the final frame ({fold.index} tokens)"
                    )
                finally:
                    if reading is not None:
                        reading.discard(resp)
                    if not kept:
                        resp.close()  # drop the connection: the server stops generating
        except engine_pool.ReplicaGone as e:
            raise interfaces.ReplicaStopped(f"{e} ({fold.index} tokens in)") from e
        except _NETWORK_ERRORS as e:
            raise interfaces.EngineStreamError(
                f"stream broken after {fold.index} tokens: {said(e)}"
            ) from e


_DONE = re.compile(rb"data: ?\[DONE\]\r?")


async def _items(
    resp: aiohttp.ClientResponse, fold: llama_completion.Fold | llama_chat.Fold
) -> AsyncGenerator[interfaces.Token | interfaces.Done, None]:
    """A streamed answer's Tokens, then its Done (none when the stream ends without one)."""
    pending = bytearray()
    async for chunk in resp.content.iter_any():
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[: end + 1]
            if _DONE.fullmatch(line) and (done := fold.end()) is not None:
                yield done
                return
            frame = parse_line(line)
            for item in fold.feed(frame) if frame is not None else ():
                yield item
                if isinstance(item, interfaces.Done):
                    return
    if (done := fold.end()) is not None:  # the connection ended after the finish
        yield done


async def wait_ready(handle: interfaces.ReplicaHandle, *, timeout_s: float) -> None:
    """Poll /health until 200; raise EngineStartError when the process exits or time is up.
    The process is left running on timeout: the caller decides to stop it."""
    client = Client(handle.base_url, timeout_s=2.0)
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    last = Health(False, None, "not asked yet")
    while True:
        ended = processes.poll_exit(handle)
        if ended is not None:
            raise interfaces.EngineStartError(
                f"engine exited before ready: {ended.reason}", exit=ended
            )
        last = await client.health()
        if last.ok:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise interfaces.EngineStartError(
                f"engine not ready after {timeout_s:g} s (last health check: {last.message})"
            )
        await asyncio.sleep(min(delay, remaining))
        # a /health answer is cheap; a long poll interval would add up to it to every start
        delay = min(delay * 1.5, 0.05)


async def describe(
    handle: interfaces.ReplicaHandle, *, vram_measured_mib: int | None = None
) -> interfaces.EngineInfo:
    """Version and slot use from /props and /slots. Raises EngineStreamError (ProtocolError)
    when the engine does not answer."""
    client = Client(handle.base_url)
    props, busy = await asyncio.gather(client.props(), client.slots_busy())
    return interfaces.EngineInfo(
        engine_version=props.build_info,
        slots_total=props.total_slots,
        slots_busy=sum(busy),
        model_digest=handle.spec.model_digest,
        vram_measured_mib=vram_measured_mib,
    )


async def adopt(
    record: Mapping[str, Any], spec: interfaces.ReplicaSpec, *, grace_s: float
) -> interfaces.ReplicaHandle | None:
    """Re-attach to a recorded engine process when it is the same process (pid and start time)
    and healthy; stop it when it is ours but unhealthy; leave a reused pid alone."""
    try:
        pid, started_at = int(record["pid"]), float(record["started_at"])
        port, log = int(record["port"]), Path(str(record["log_path"]))
    except (KeyError, TypeError, ValueError):
        return None
    if not processes.pid_alive(pid, started_at):
        return None
    handle = interfaces.ReplicaHandle(
        spec=spec,
        pid=pid,
        port=port,
        started_at=started_at,
        log_path=log,
        base_url=f"http://127.0.0.1:{port}",
    )
    if (await Client(handle.base_url, timeout_s=2.0).health()).ok:
        return handle
    await processes.stop_replica(handle, grace_s=grace_s)
    return None


class ServerEngine:
    """What every engine that runs a llama-server-compatible process shares: readiness,
    streaming, describe, exit polling, stop and adoption. Subclasses add how to start it."""

    name = "llama-server"
    adopt_stop_grace_s = 10.0
    pool: engine_pool.Pool | None = None  # token streams keep their connections (the daemon's)

    async def wait_ready(self, handle: interfaces.ReplicaHandle, *, timeout_s: float) -> None:
        await wait_ready(handle, timeout_s=timeout_s)

    def generate(
        self,
        handle: interfaces.ReplicaHandle,
        request: interfaces.GenerateRequest,
    ) -> AsyncIterator[interfaces.Token | interfaces.Done]:
        if self.pool is None:
            return Client(handle.base_url).generate(request)
        return Client(handle.base_url).generate(
            request,
            session=self.pool.session(handle.base_url),
            reading=self.pool.reading(handle.base_url),
        )

    async def describe(self, handle: interfaces.ReplicaHandle) -> interfaces.EngineInfo:
        # VRAM is measured by the GPU observer (per-process use of handle.pid).
        return await describe(handle)

    def poll_exit(self, handle: interfaces.ReplicaHandle) -> interfaces.ExitInfo | None:
        return processes.poll_exit(handle)

    async def stop(
        self, handle: interfaces.ReplicaHandle, *, grace_s: float
    ) -> interfaces.ExitInfo:
        if self.pool is not None:
            await self.pool.forget(handle.base_url)
        return await processes.stop_replica(handle, grace_s=grace_s)

    keepers = 0  # daemons that asked to keep connections and have not closed yet

    def keep_connections(self) -> None:
        """Reuse connections across token streams until `close` (a daemon serving)."""
        if self.pool is None:
            self.pool = engine_pool.Pool()
        self.keepers += 1

    async def close(self) -> None:
        """The daemon that kept connections stops: close them once none is left."""
        self.keepers = max(0, self.keepers - 1)
        if self.keepers == 0 and self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def adopt(
        self, record: Mapping[str, Any], spec: interfaces.ReplicaSpec
    ) -> interfaces.ReplicaHandle | None:
        return await adopt(record, spec, grace_s=self.adopt_stop_grace_s)
