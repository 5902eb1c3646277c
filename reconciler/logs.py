"""Logging: JSON Lines (one object per line) for machines, a pretty format for people.

Every line has ts, level, event and a one-sentence `human` text; lines about a task carry its
`task_id` and a `correlation_id` (the task id unless a request supplied one), so
`grep '"correlation_id": "X"'` follows one task through the daemon (HME-030).
Call `emit(log, "event.name", "Human sentence.", key=value, ...)`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, TextIO

ROOT = "llama_orch"
# one encoder for every line: json.dumps with options builds a new one at each call
_encode = json.JSONEncoder(default=str, ensure_ascii=False).encode
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"{ROOT}.{name}")


def emit(
    log: logging.Logger,
    event: str,
    human: str,
    *,
    level: int = logging.INFO,
    lines: bool = False,
    **fields: Any,
) -> None:
    """`lines`: `human` is the daemon's own text written in lines (a fix to copy), which the
    pretty format shows as lines; any other newline there is escaped."""
    if "task_id" in fields and "correlation_id" not in fields:
        fields["correlation_id"] = fields["task_id"]
    extra = {"orch_event": event, "orch_fields": fields, "orch_lines": lines}
    log.log(level, human, extra=extra)


def _fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    event = getattr(record, "orch_event", None) or record.name.removeprefix(ROOT + ".")
    fields: dict[str, Any] = dict(getattr(record, "orch_fields", {}) or {})
    for key, value in record.__dict__.items():  # plain `extra=` from libraries
        if key not in _RESERVED and not key.startswith("orch_") and key not in fields:
            fields[key] = value
    return event, fields


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # formatted once per record: with --log-file, stderr's handler and the file's both ask
        cached: str | None = getattr(record, "orch_json", None)
        if cached is not None:
            return cached
        line = self._format(record)
        record.orch_json = line
        return line

    def _format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": event,
            "human": record.getMessage(),
        }
        line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return writable(_encode(line))


class PrettyFormatter(logging.Formatter):
    COLORS: ClassVar[dict[str, str]] = {
        "WARNING": "\033[33m",
        "ERROR": "\033[31m",
        "CRITICAL": "\033[31;1m",
    }

    def __init__(self, color: bool) -> None:
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        event, fields = _fields(record)
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        keys = ("task_id", "pool_id", "replica_id")
        tag = " ".join(f"{k.split('_')[0]}={fields[k]}" for k in keys if fields.get(k))
        # one line each, as a terminal shows it: a newline or an escape sequence in what a
        # client sent (a path, an id) must not forge a line or drive the terminal; only the
        # daemon's own text written in lines (`emit(lines=True)`: a fix with commands to
        # copy) goes on under it, each line indented and escaped, as no record begins
        message = record.getMessage()
        parts = message.split("\n") if getattr(record, "orch_lines", False) else [message]
        text = f"{ts} {record.levelname[:4]:4} " + f"\n{CONTINUED}".join(
            _on_one_line(part) for part in parts
        )
        if tag:
            text += f"  [{_on_one_line(tag)}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.color and record.levelname in self.COLORS:
            text = f"{self.COLORS[record.levelname]}{text}\033[0m"
        del event
        return writable(text)


CONTINUED = " " * 18  # under a record's text: past its time and level


def _on_one_line(text: str) -> str:
    """`text` with every character that does not print (newlines, ESC, BEL …) escaped."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
        for c in text
    )


def writable(text: str) -> str:
    """`text` with lone surrogates (from file names that are not UTF-8) as `\\udcxx`, so
    writing the line to a UTF-8 stream or file cannot fail ("--- Logging error ---").
    In a JSON line that is the JSON escape of the same character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# the loggers `setup` configures: the project's, the HTTP server's, and the rooms that cannot
# import this module (plugins/, state/)
ROOMS = ("plugins", "state")
CONFIGURED = (ROOT, "aiohttp", "asyncio", *ROOMS)
REPEAT_S = 30.0


def setup(
    *,
    fmt: str = "json",
    level: str = "info",
    log_file: Path | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure the root project logger once, at the one entry point (`orchctl`).
    `fmt` is "json", "pretty", or "auto": pretty when `stream` is a terminal, else JSON."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "pretty" if stream.isatty() else "json"
    root = logging.getLogger(ROOT)
    root.handlers.clear()
    root.setLevel(level.upper())
    root.propagate = False
    handler = logging.StreamHandler(stream)
    if fmt == "pretty":
        # colour on a terminal that shows it, unless the user said no (no-color.org)
        color = (
            stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        )
        handler.setFormatter(PrettyFormatter(color=color))
    else:
        handler.setFormatter(JsonLinesFormatter())
    root.addHandler(handler)
    # watchdog logs a benign race at ERROR when its observer stops
    # ("queue_events() called when the thread is inactive"); keep real trouble only
    logging.getLogger("watchdog").setLevel(logging.CRITICAL)
    if log_file is not None:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(JsonLinesFormatter())
        root.addHandler(file_handler)
    # the HTTP server's own lines (a request too malformed to reach a handler) in the same
    # format and place, not as bare tracebacks on stderr (api.start makes them one line)
    server = logging.getLogger("aiohttp")
    server.handlers = list(root.handlers)
    server.setLevel(logging.WARNING)
    server.propagate = False
    # the event loop's own lines (an accept that failed: no descriptors left) likewise, and
    # each kind at most once per REPEAT_S: asyncio retries such an accept every second
    loop_log = logging.getLogger("asyncio")
    loop_log.handlers = list(root.handlers)
    loop_log.setLevel(logging.WARNING)
    loop_log.propagate = False
    loop_log.filters = [f for f in loop_log.filters if not isinstance(f, Repeats)]
    loop_log.addFilter(Repeats())
    # the plugins' and the state room's lines (they cannot import this module: layering) in
    # the same format and places, never Python's bare last-resort lines on stderr
    for name in ROOMS:
        room = logging.getLogger(name)
        room.handlers = list(root.handlers)
        room.setLevel(level.upper())
        room.propagate = False


class Repeats(logging.Filter):
    """Lets a line through once per REPEAT_S for each kind (logger, message, exception type);
    the next one that passes says how many were left out."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.name, str(record.msg), type(exc).__name__)
        said, left_out = self._last.get(key, (0.0, 0))
        if record.created - said < REPEAT_S and said:
            self._last[key] = (said, left_out + 1)
            return False
        self._last[key] = (record.created, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like it in the last {REPEAT_S:.0f} s)"
        return True
