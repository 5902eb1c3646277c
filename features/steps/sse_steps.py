"""Steps for "Watching a task over SSE": a plain HTTP client reading the event stream."""

from __future__ import annotations

import http.client
import json
import signal
import urllib.parse
from typing import Any

from behave import then, when
from orch_support import frames, start_daemon, status, wait_for


def _url(context: Any) -> str:
    found: str = wait_for(
        context,
        lambda: (s := status(context)) and s["daemon"].get("url"),
        "the daemon's URL in .orch/status.json",
    )
    return found


def _read(context: Any, task_id: str, *, limit: int | None, after: int) -> list[dict[str, Any]]:
    url = urllib.parse.urlsplit(_url(context))
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("GET", f"/v1/tasks/{task_id}/events", headers={"Last-Event-ID": str(after)})
    response = conn.getresponse()
    assert response.status == 200, response.status
    got: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    try:
        while limit is None or len(got) < limit:
            raw = response.readline()
            if not raw:  # the server ended the stream
                break
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                continue
            if line:
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")
                continue
            if not fields:
                continue
            got.append(fields)
            fields = {}
            if got[-1].get("event") in ("end", "error"):
                break
    finally:
        conn.close()  # hang up
    return got


@when('I read the event stream of task "{task_id}" to the end')
def read_all(context: Any, task_id: str) -> None:
    context.reads = [_read(context, task_id, limit=None, after=0)]


@when('I read {n:d} events of the stream of task "{task_id}" and hang up')
def read_some(context: Any, n: int, task_id: str) -> None:
    context.reads = [_read(context, task_id, limit=n, after=0)]


@when('I read the event stream of task "{task_id}" to the end, resuming after the last event I saw')
def read_rest(context: Any, task_id: str) -> None:
    last = int(context.reads[-1][-1]["id"])
    context.reads.append(_read(context, task_id, limit=None, after=last))


@when("I restart the daemon")
def restart(context: Any) -> None:
    context.daemon.send_signal(signal.SIGINT)
    assert context.daemon.wait(30) == 0
    start_daemon(context)
    wait_for(
        context,
        lambda: (s := status(context)) and s["daemon"]["state"] == "running" and s["daemon"]["url"],
        "the restarted daemon serving",
    )


def _logged(context: Any, task_id: str) -> list[tuple[int, str, Any]]:
    return [(f.id, f.event, f.data) for f in frames(context, task_id)]


def _streamed(reads: list[list[dict[str, Any]]]) -> list[tuple[int, str, Any]]:
    return [(int(f["id"]), f["event"], json.loads(f["data"])) for read in reads for f in read]


@then('the stream has the frames of the event log of task "{task_id}", in order')
def stream_is_log(context: Any, task_id: str) -> None:
    assert _streamed(context.reads) == _logged(context, task_id)


@then("the first event carries a retry interval and the last is an end frame")
def retry_and_end(context: Any) -> None:
    read = context.reads[0]
    assert read[0].get("retry") == "2000" and read[-1]["event"] == "end", read[-1]


@then('together the two reads have the frames of the event log of task "{task_id}", each once')
def reads_are_log(context: Any, task_id: str) -> None:
    streamed = _streamed(context.reads)
    assert [f[0] for f in streamed] == list(range(1, len(streamed) + 1)), "a gap or a duplicate"
    assert streamed == _logged(context, task_id)
    assert len(context.reads[0]) > 0 and len(context.reads[1]) > 0
