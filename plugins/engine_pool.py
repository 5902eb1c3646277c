"""Kept-alive HTTP connections to engine replicas, for their token streams.

Each task's stream used to open its own session and TCP connection to the replica and close
both at its end: under a burst of short tasks the connect alone was about 0.7 ms of the
daemon's time per task. A `Pool` keeps one `aiohttp.ClientSession` per replica URL (and
event loop), so a slot's next request reuses the connection the last one left. The daemon
gives each engine adapter a pool (`llama_server.ServerEngine.pool`) and closes it when it
stops; an adapter's `stop` forgets the replica's connections. Without a pool (tests that drive
an adapter directly) every stream opens and closes its own, as before.

Forgetting a replica first ends the streams still reading from it with `ReplicaGone`: closing an
aiohttp session leaves a response being read blocked for ever, so a task still running on a
replica its pool drained would wait for the stall timeout (a minute) and fail as a stall.

A connection is kept only after a stream that ended cleanly and was read to its end; one cut
short (a cancel, an error) is closed, so the engine stops generating. Idle connections are
dropped after KEEPALIVE_S, below llama-server's own idle timeout (5 s), so a kept connection
is never one the server has already closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

KEEPALIVE_S = 2.0
END_READ_S = 1.0  # a stream's rest after its final frame: the server ends it at once


class ReplicaGone(Exception):
    """The replica a stream was reading from was stopped (drained) under it."""


class Pool:
    def __init__(self) -> None:
        self._sessions: dict[tuple[int, str], aiohttp.ClientSession] = {}
        self._reading: dict[str, set[aiohttp.ClientResponse]] = {}  # base URL → live streams

    def reading(self, base_url: str) -> set[aiohttp.ClientResponse]:
        """The responses being read from `base_url`: a stream adds its own while it reads."""
        return self._reading.setdefault(base_url, set())

    def session(self, base_url: str) -> aiohttp.ClientSession:
        """The session for `base_url` in the running loop (opened on first use)."""
        key = (id(asyncio.get_running_loop()), base_url)
        session = self._sessions.get(key)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S)
            session = self._sessions[key] = aiohttp.ClientSession(connector=connector)
        return session

    async def forget(self, base_url: str) -> None:
        """End the streams still reading from `base_url` (`ReplicaGone`), then close its
        connections (its replica is being stopped)."""
        for resp in self._reading.pop(base_url, set()):
            resp.content.set_exception(
                ReplicaGone(f"the replica at {base_url} was stopped while the task ran")
            )
        for key in [k for k in self._sessions if k[1] == base_url]:
            await self._sessions.pop(key).close()

    async def close(self) -> None:
        """Close every connection (the daemon stopping)."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    timeout: aiohttp.ClientTimeout,
    *,
    retry: bool,
) -> aiohttp.ClientResponse:
    """POST `body`; with `retry` (a pooled session) once more, on a fresh connection, when a
    kept one turns out to be closed: then nothing reached the engine."""
    try:
        return await session.post(url, json=body, timeout=timeout)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        if not retry:
            raise
        return await session.post(url, json=body, timeout=timeout)


async def read_to_end(resp: aiohttp.ClientResponse) -> bool:
    """Read what follows a stream's final frame, so its connection can serve the next
    request; False (close it) when the stream does not end at once."""
    try:
        await asyncio.wait_for(resp.content.read(), END_READ_S)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
    return resp.content.at_eof()
