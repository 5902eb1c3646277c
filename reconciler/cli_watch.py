"""Following a task as it runs: `orchctl watch ID`, and the waiting half of `submit --wait`.

`follow` tails results/<id>.events.jsonl from where it last read (complete lines only; a line
that is not a frame is skipped) and prints each frame through a `Printer`, until a terminal
frame, or a terminal result (the daemon writes the frame first, the result second). It never
waits in silence: every `PROBE_EVERY_S` it checks that a daemon still serves the folder
(`probing.probe`) and stops with exit 3 when none does; Ctrl-C stops watching, not the task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from reconciler import cli_common, cli_sse, logs, probing
from reconciler.cli_common import EXIT_ENV, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Refused
from state import events, ids, pending, results

POLL_S = 0.05
PROBE_EVERY_S = 2.0
RESULT_GRACE_S = 5.0  # after the terminal frame, how long the result may take to follow


class Tail:
    """The complete lines appended to an event log since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def frames(self) -> list[events.EventFrame]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            return []
        cut = data.rfind(b"\n") + 1  # a torn last line is read again once it is complete
        self.offset += cut
        out = []
        for raw in data[:cut].splitlines():
            try:
                out.append(events.EventFrame.model_validate_json(raw))
            except pydantic.ValidationError:
                continue  # not a frame (an empty line, or damage): nothing to show
        return out


class Printer:
    """Frames as people read them: the text as it streams, and one bracketed line per
    transition. `ends=False` leaves out the terminal line (submit --wait prints a summary);
    `as_json` prints every frame as one JSON line; `quiet` prints nothing."""

    def __init__(self, *, as_json: bool = False, ends: bool = True, quiet: bool = False) -> None:
        self.as_json, self.ends, self.quiet = as_json, ends, quiet
        self.mid_line = False

    def frame(self, frame: events.EventFrame) -> None:
        if self.quiet:
            return
        if self.as_json:
            shown = frame.model_dump(mode="json")
            if not shown["ts"]:  # read from SSE, which carries none: absent, never ""
                del shown["ts"]
            print(logs.writable(json.dumps(shown, ensure_ascii=False)), flush=True)
            return
        d: dict[str, Any] = frame.data
        if frame.event == "token":
            text = str(d.get("t", ""))
            print(text, end="", flush=True)
            if text:
                self.mid_line = not text.endswith("\n")
        elif frame.event == "queued":
            self.line(f"[queued at position {d.get('queue_position')}{_predicted(d)}{_budgets(d)}]")
        elif frame.event == "started":
            attempt = d.get("attempt")
            again = f", attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
            self.line(f"[started on {d.get('replica_id')} (pool {d.get('pool_id')}){again}]")
        elif frame.event == "end" and self.ends:
            self.line(f"[end: {d.get('finish_reason')}, {d.get('tokens_out')} tokens]")
        elif frame.event == "error" and self.ends:
            hint = f" (hint: {d['hint']})" if d.get("hint") else ""
            self.line(f"[error {d.get('code')}: {d.get('message')}{hint}]")

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self.newline()
        print(text, flush=True)

    def newline(self) -> None:
        if self.mid_line:
            print(flush=True)
            self.mid_line = False


def _predicted(d: dict[str, Any]) -> str:
    ms = d.get("predicted_start_ms")
    return f", predicted start {ms} ms" if isinstance(ms, int | float) else ""


def _budgets(d: dict[str, Any]) -> str:
    """`; session s1: 7 turns, 900 tokens, 600 s left` for a session task."""
    b = d.get("budgets")
    if not isinstance(b, dict):
        return ""
    parts = [f"{b.get('turns_remaining')} turns"]
    if b.get("tokens_budget_remaining") is not None:
        parts.append(f"{b['tokens_budget_remaining']} tokens")
    ttl = b.get("ttl_ms_remaining")
    if isinstance(ttl, int | float):
        parts.append(f"{ttl / 1000:.0f} s")
    return f"; session {b.get('session_id')}: {', '.join(parts)} left"


@dataclass(frozen=True)
class Ended:
    frame: events.EventFrame | None  # the terminal frame, when the log has one
    result: results.Result | None  # the terminal result, when it could be read
    why: str | None = None  # with neither: what is known of how it ended

    @property
    def succeeded(self) -> bool:
        if self.result is not None:
            return self.result.status == "succeeded"
        return (
            self.frame is not None
            and self.frame.event == "end"
            and self.frame.data.get("finish_reason") != "canceled"
        )


def source_url(folder: cli_common.Folder, given: str | None) -> str | None:
    """The HTTP API to read events from: `--url`, else the serving daemon's own address."""
    if given:
        parts = urllib.parse.urlsplit(given)
        if parts.scheme != "http" or not parts.hostname:
            raise Refused(
                cli_common.EXIT_USAGE,
                f"--url {given!r} is not an http:// URL",
                hint="give the daemon's address, e.g. --url http://127.0.0.1:8080, or leave "
                "--url out to use the one in .orch/status.json",
            )
        return given.rstrip("/")
    seen = probing.probe(folder.state_dir)
    if not seen.serving or seen.status is None or not seen.responding(time.time()):
        return None  # a daemon that does not pass would not answer either: the files tell
    return seen.status.daemon.url


def follow(
    folder: cli_common.Folder,
    task_id: str,
    printer: Printer,
    *,
    timeout_s: float,
    url: str | None = None,
    token: str | None = None,
) -> Ended:
    """Print the task's frames until it ends: from the SSE endpoint at `url` when it can be
    used (reconnecting with Last-Event-ID), else (or after losing it) from the event log
    file, never printing a frame twice. Raise `Refused` when no daemon serves the folder (3),
    on timeout (1) or on Ctrl-C (130)."""
    shown = 0
    deadline = time.monotonic() + timeout_s
    try:
        if url is not None:
            try:
                for frame in cli_sse.frames(url, task_id, token=token, deadline=deadline):
                    printer.frame(frame)
                    shown = frame.id
                    if frame.terminal:
                        return Ended(frame, _terminal_result(folder, task_id, RESULT_GRACE_S))
                # the daemon says nothing more will come, and no terminal frame came
                result = _terminal_result(folder, task_id, 0)
                why = None if result else f"task {task_id} is {_where(folder, task_id, None)}"
                return Ended(None, result, why)
            except (cli_sse.Unavailable, cli_sse.TimedOut):
                pass  # the files have every frame: go on from there (or say it timed out)
        return _follow_files(
            folder, task_id, printer, timeout_s=timeout_s, deadline=deadline, after=shown
        )
    except KeyboardInterrupt:
        printer.newline()
        raise Refused(
            EXIT_INTERRUPTED,
            f"stopped watching; task {task_id} keeps running "
            f"(cancel it with: orchctl cancel {task_id})",
            prefix=False,
        ) from None


def _follow_files(
    folder: cli_common.Folder,
    task_id: str,
    printer: Printer,
    *,
    timeout_s: float,
    deadline: float,
    after: int,
) -> Ended:
    tail = Tail(folder.results.events_path(task_id))
    next_probe = 0.0
    unheld = 0  # probes in a row that found no file of the task in the spool
    while True:
        for frame in tail.frames():
            if frame.id <= after:
                continue  # already shown from the SSE stream
            printer.frame(frame)
            if frame.terminal:
                return Ended(frame, _terminal_result(folder, task_id, RESULT_GRACE_S))
        result = folder.results.read(task_id)
        if result is not None and result.terminal:
            last = next((f for f in _show(tail, printer, after) if f.terminal), None)
            return Ended(last, result)
        now = time.monotonic()
        if now >= next_probe:
            next_probe = now + PROBE_EVERY_S
            seen = probing.probe(folder.state_dir)
            if not seen.serving:
                printer.newline()
                raise Refused(
                    EXIT_ENV,
                    f"no daemon is serving this folder: task {task_id} is "
                    f"{_where(folder, task_id, result)} and will not move until "
                    f"`{folder.serve_command()}` starts",
                )
            stopping = seen.status is not None and seen.status.daemon.stopping_since
            if stopping and (result is None or result.status != "running"):
                printer.newline()
                raise Refused(  # it drains its running tasks only: this one waits for a start
                    EXIT_ENV,
                    f"the daemon (pid {seen.pid}) is stopping: task {task_id} is "
                    f"{_where(folder, task_id, result)} and will run at its next start",
                )
            # no file of the task waits in the spool (a live task's is in active/) and its
            # result says no live state: nothing holds it, so nothing more will come (twice,
            # a probe apart, so a file being claimed between two folders is not missed)
            held = pending.find(folder.spool, task_id) is not None
            unheld = 0 if held else unheld + 1
            if unheld >= 2:
                return Ended(None, None, why=f"task {task_id} is {_where(folder, task_id, result)}")
            if not seen.responding(time.time()) and seen.written_at is not None:
                printer.newline()
                raise Refused(  # stopped by a signal, hung on a disk: it may never move
                    EXIT_ENV,
                    f"the daemon (pid {seen.pid}) has not responded for "
                    f"{cli_common.ago(time.time() - seen.written_at)}: task {task_id} is "
                    f"{_where(folder, task_id, result)} and goes on when the daemon does",
                    hint="`orchctl status` shows it; restart the daemon if it is hung",
                )
        if now >= deadline:
            printer.newline()
            raise Refused(
                EXIT_FAILED,
                f"no result after {timeout_s:g} s; "
                f"task {task_id} is {_where(folder, task_id, result)}",
                hint=f"follow it again with: orchctl watch {task_id}",
            )
        time.sleep(POLL_S)


def _show(tail: Tail, printer: Printer, after: int) -> list[events.EventFrame]:
    frames = [f for f in tail.frames() if f.id > after]
    for frame in frames:
        printer.frame(frame)
    return frames


def _where(folder: cli_common.Folder, task_id: str, result: results.Result | None) -> str:
    if result is not None:
        return result.status
    problem = folder.results.problem(task_id)
    if problem is not None:
        shown = folder.shown(folder.results.path(task_id))
        return f"of unknown state ({shown} is unreadable: {cli_common.plain_text(problem)})"
    return "waiting in the spool"


def ended_in_log(folder: cli_common.Folder, task_id: str) -> str | None:
    """The event of the terminal frame in the task's event log (`end`, `error`), or None
    when the log has none (the task has not ended, or its log is gone)."""
    last = next((f for f in reversed(Tail(folder.results.events_path(task_id)).frames())), None)
    return last.event if last is not None and last.terminal else None


def _terminal_result(
    folder: cli_common.Folder, task_id: str, grace_s: float
) -> results.Result | None:
    end = time.monotonic() + grace_s
    while True:
        result = folder.results.read(task_id)
        if (result is not None and result.terminal) or time.monotonic() >= end:
            return result if result is not None and result.terminal else None
        time.sleep(POLL_S)


def summary(ended: Ended) -> str:
    """One line: "succeeded: 64 tokens, queued 12 ms, first token 35 ms, 910 ms decoding",
    or the status with the error's code, message and hint."""
    result = ended.result
    if result is None:
        frame = ended.frame
        data = frame.data if frame is not None else {}
        if frame is not None and frame.event == "end":
            return f"ended: {data.get('finish_reason')}, {_tokens(data.get('tokens_out'))}"
        if frame is None:
            return f"ended without a terminal frame in its event log: {ended.why or 'unknown'}"
        return _error_line("failed", data.get("code"), data.get("message"), data.get("hint"))
    if result.status == "succeeded":
        t = result.timings
        parts = [_tokens(result.tokens_out)]
        if t.queue_ms is not None:
            parts.append(f"queued {t.queue_ms} ms")
        if t.first_token_ms is not None:
            parts.append(f"first token {t.first_token_ms} ms")
        if t.decode_time_ms is not None:
            parts.append(f"{t.decode_time_ms} ms decoding")
        # a chat answered with tool calls streams no text: the calls are the answer
        calls = [_call(c) for c in result.tool_calls or ()]
        called = f"called {'; '.join(calls)}; " if calls else ""
        return f"succeeded: {called}" + ", ".join(parts)
    if result.status == "canceled":
        return f"canceled after {_tokens(result.tokens_out)}"
    error = result.error
    if error is None:
        return result.status
    return _error_line(result.status, error.code, error.message, error.hint)


def _call(call: dict[str, Any]) -> str:
    """`get_weather({"city": "Oslo"})` for one tool call of a result."""
    found = call.get("function")
    function: dict[str, Any] = found if isinstance(found, dict) else {}
    name = str(function.get("name") or "?")
    arguments = str(function.get("arguments") or "")
    # the model's own text: what does not print (a terminal's escapes) is shown escaped
    return f"{ids.shown(name, 80)}({ids.shown(arguments, 200)})"


def _tokens(n: object) -> str:
    return "1 token" if n == 1 else f"{n if isinstance(n, int) else 0} tokens"


def _error_line(status: str, code: object, message: object, hint: object) -> str:
    text = f"{status}: {code}: {message}" if code else f"{status}: {message}"
    return text + (f" (hint: {hint})" if hint else "")


def cmd_watch(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    cli_common.require_safe_id(args.task_id)
    known = cli_common.lookup(folder, args.task_id)
    if known is None:
        raise Refused(
            EXIT_FAILED,
            f"no task {cli_common.printable(args.task_id)} in this folder",
            hint="`orchctl tasks` lists them",
        )
    if (
        known.problem is not None
        and pending.find(folder.spool, args.task_id) is None
        and not folder.results.events_path(args.task_id).exists()
    ):
        # a result file that is no result, no task file of the id in the spool (the daemon
        # holds none: a live task's file is in active/) and no event log: nothing will ever
        # change it, so waiting for it would only wait out --timeout
        raise Refused(
            EXIT_FAILED,
            f"task {args.task_id} is {_where(folder, args.task_id, None)}, and nothing will "
            "change it: no file of it waits in the spool and it has no event log",
            hint=f"put the right {args.task_id}.json back, or remove it and "
            f"{args.task_id}.events.jsonl to free the id",
        )
    printer = Printer(as_json=args.json)
    ended = follow(
        folder,
        args.task_id,
        printer,
        timeout_s=args.timeout,
        # --json prints the log's own frames, `ts` included, from the file beside it; the
        # SSE stream (which has no `ts`) only where --url names a daemon to read from
        url=source_url(folder, args.url) if args.url or not args.json else None,
        token=cli_sse.token_from(args.token_env),
    )
    if ended.frame is None and not args.json:
        printer.line(summary(ended))
    elif ended.frame is None and ended.result is None:  # --json: no frame to end the lines
        cli_common.warn(summary(ended))
    printer.newline()
    sys.stdout.flush()
    return EXIT_OK if ended.succeeded else EXIT_FAILED
