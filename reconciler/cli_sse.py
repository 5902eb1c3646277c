"""Reading a task's events from the daemon's SSE endpoint, for `orchctl watch` and
`submit --wait` while the HTTP API is up (standard library only: http.client).

`frames(url, task_id, after=N)` yields the frames after id N and ends after the terminal one.
A dropped connection is resumed with `Last-Event-ID` (no gap, no duplicate: the server replays
from the event log); `Unavailable` is raised when the server cannot be reached or refuses, so
the caller falls back to reading the files. The token comes from `--token-env` (default the
daemon's `AUTH_TOKEN`), never from the command line.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator

from state import events

RECONNECTS = 5
READ_TIMEOUT_S = 40.0  # the server sends a keep-alive comment every 15 s


class Unavailable(Exception):
    """The SSE endpoint cannot be used now (not reachable, refused, or not this API)."""


class Stopping(Unavailable):
    """The daemon ended the stream because it stops: reconnecting would only meet that again
    (or no daemon), so the caller reads the files and asks what serves the folder."""


STOPPING_COMMENT = ": the daemon is stopping"  # how the daemon's last words begin


class TimedOut(Exception):
    """The deadline passed before the task's terminal frame."""


class _Over(Exception):
    """The daemon answered 204: nothing more will come (the client has the end already, or
    the task ended without a terminal frame in its log)."""


def token_from(env_name: str | None) -> str | None:
    return os.environ.get(env_name or "AUTH_TOKEN") or None


def frames(
    base_url: str,
    task_id: str,
    *,
    after: int = 0,
    token: str | None = None,
    deadline: float | None = None,
) -> Iterator[events.EventFrame]:
    """The task's frames after `after`, up to its terminal one, or up to where the daemon
    says nothing more will come (a task that ended with its log cut: no terminal frame);
    `TimedOut` once the monotonic `deadline` passes (a read waits no longer than that)."""
    last, failures = after, 0
    while True:
        try:
            for frame in _one_connection(
                base_url, task_id, after=last, token=token, deadline=deadline
            ):
                last, failures = frame.id, 0
                yield frame
                if frame.terminal:
                    return
            raise ConnectionError("the stream ended before the task did")
        except _Over:
            return
        except (OSError, http.client.HTTPException, ConnectionError) as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimedOut() from None
            failures += 1
            if failures > RECONNECTS:
                raise Unavailable(f"lost the event stream: {exc}") from None
            time.sleep(min(2.0, 0.1 * 2**failures))


def _one_connection(
    base_url: str, task_id: str, *, after: int, token: str | None, deadline: float | None
) -> Iterator[events.EventFrame]:
    url = urllib.parse.urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise Unavailable(f"{base_url} is not an http:// URL")
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=_read_timeout(deadline))
    headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        try:
            conn.request("GET", f"/v1/tasks/{urllib.parse.quote(task_id)}/events", headers=headers)
            response = conn.getresponse()
        except OSError as exc:
            if after == 0:
                raise Unavailable(f"cannot reach {base_url}: {exc}") from None
            raise
        if response.status == 204:  # resumed at or past the terminal frame: nothing more
            raise _Over()
        if response.status != 200:
            raise Unavailable(f"{base_url} answered {response.status} {response.reason}")

        def before_read() -> None:
            if deadline is not None and conn.sock is not None:
                conn.sock.settimeout(_read_timeout(deadline))

        yield from _parse(response, before_read)
    finally:
        conn.close()


def _read_timeout(deadline: float | None) -> float:
    """How long one read may block: READ_TIMEOUT_S, and never past `deadline`."""
    if deadline is None:
        return READ_TIMEOUT_S
    return max(0.01, min(READ_TIMEOUT_S, deadline - time.monotonic()))


def _parse(
    response: http.client.HTTPResponse, before_read: Callable[[], None]
) -> Iterator[events.EventFrame]:
    fields: dict[str, str] = {}
    while True:
        before_read()
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if line.startswith(STOPPING_COMMENT):
            raise Stopping(line.removeprefix(": "))
        if line.startswith(":"):
            continue  # keep-alive
        if line:
            key, _, value = line.partition(":")
            fields[key] = value.removeprefix(" ")
            continue
        if "data" in fields and "id" in fields:
            yield events.EventFrame(
                id=int(fields["id"]),
                event=fields.get("event", "message"),
                data=json.loads(fields["data"]),
                ts="",
            )
        fields = {}
