"""What every `orchctl` verb shares: exit codes, the `Refused` error, the folder an orch.yaml
names, looking up a task id in it, and turning loader errors into plain lines.

The verbs live in `cli_tasks`, `cli_watch`, `cli_validate`, `cli_init` and `cli_status`;
`cli.main` parses the command line and turns `Refused` (and any surprise) into one plain line
and an exit code, so no verb prints a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import stat
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from reconciler import probing
from reconciler.configuring import LAST_GOOD
from state import desired, ids, loading, pending, results, spool

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class Refused(Exception):
    """A verb cannot go on: `cli.main` prints `orchctl: message` (without the prefix when
    `prefix` is false) and `hint: …` on standard error, and exits with `code`."""

    def __init__(
        self, code: int, message: str, *, hint: str | None = None, prefix: bool = True
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.prefix = prefix

    def lines(self) -> list[str]:
        head = f"orchctl: {self.message}" if self.prefix else self.message
        return [head] + ([f"hint: {self.hint}"] if self.hint else [])


def report_folder(out: Path, *, keep: bool = True) -> Path:
    """`--out`, made (with its parents) and written to once, so that a folder that cannot
    take the report fails before a suite runs, not after it (its results lost). Without
    `keep` the folders made for the test are removed again (nothing is left should the run
    not get as far as its report)."""
    if out.exists() and not out.is_dir():
        raise Refused(
            EXIT_USAGE,
            f"--out {printable(str(out))} is a file, not a folder",
            hint="name a folder (it is created), or leave --out out",
        )
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise Refused(
            EXIT_USAGE,
            f"--out {printable(str(out))} cannot take the report: {exc.strerror or exc}",
            hint="name a folder you may write to, or leave --out out",
        ) from None
    finally:
        for folder in made if not keep else ():  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


def warn(message: str) -> None:
    print(f"orchctl: {message}", file=sys.stderr, flush=True)


# what the command has done that stays done (a task delivered, a cancel written): said with
# an error that stops it after, so a script does not take a failure for nothing done
DONE: list[str] = []


def did(what: str) -> None:
    DONE.append(what)


# -- the folder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    """The spool, results and state folders an orch.yaml names (relative to its folder)."""

    config_path: Path
    base: Path
    spool: spool.Spool
    results: results.ResultStore
    state_dir: Path
    paths: desired.PathsConfig = field(default_factory=desired.PathsConfig)

    def shown(self, path: Path) -> str:
        """`path` as a user reads it: relative to orch.yaml's folder when inside it."""
        try:
            return str(path.resolve().relative_to(self.base))
        except ValueError:
            return str(path)

    def here(self, path: Path) -> str:
        """`path` as a user at this shell opens it: as `shown` in orch.yaml's folder, else
        relative to the working folder when inside it, else absolute (a path relative to
        orch.yaml's folder, printed in another one, names a file that is not there)."""
        try:
            cwd = Path.cwd().resolve()
        except OSError:  # no working folder any more
            return str(path.resolve())
        if cwd == self.base:
            return self.shown(path)
        resolved = path.resolve()
        try:
            return str(resolved.relative_to(cwd))
        except ValueError:
            return str(resolved)

    def serve_command(self) -> str:
        return f"orchctl serve --config {self.config_path}"


def open_folder(config_path: Path) -> Folder:
    """The folders named by orch.yaml. A broken orch.yaml must not lock the operator out
    (the daemon keeps serving the last good one): fall back to its raw `paths:`, or the
    defaults, and say so."""
    last_good = config_path.parent / LAST_GOOD
    if not config_path.is_file() and not last_good.is_file():
        what = "is not a file" if config_path.exists() else "not found"
        raise Refused(
            EXIT_USAGE,
            f"{config_path} {what}",
            hint="run orchctl in the folder of your orch.yaml, pass --config PATH, "
            "or write one with `orchctl init`",
        )
    if not config_path.is_file():
        # gone (or replaced) while a daemon serves this folder: it keeps its last good
        # config, so its status and tasks stay readable through that one's folders
        what = "is not a file" if config_path.exists() else "not found"
        warn(
            f"warning: {config_path} {what}; using the last config a daemon applied here "
            f"({last_good}); put orch.yaml back (`git checkout {config_path.name}`, or copy "
            f"{LAST_GOOD})"
        )
        loaded = desired.load_desired(last_good)
    else:
        loaded = desired.load_desired(config_path)
        unread = loaded.data is None and loaded.errors and loaded.errors[0].line is None
        if unread and last_good.is_file():
            # not even read (a link, permissions, size): a daemon serving here keeps its last
            # good config, and so do the folders read through it
            first = loaded.errors[0]
            warn(
                f"warning: {config_path} {first.message}; using the last config a daemon "
                f"applied here ({last_good})" + (f"; {first.hint}" if first.hint else "")
            )
            loaded = desired.load_desired(last_good)
    if loaded.value is not None:
        paths = loaded.value.paths
    elif loaded.data is None and loaded.errors and loaded.errors[0].line is None:
        # not even read (permissions, size, encoding): nothing to fall back on but guesses
        first = loaded.errors[0]
        raise Refused(
            EXIT_USAGE,
            f"{config_path} {first.message}",
            hint=first.hint or "check the file's owner and permissions",
        )
    else:
        more = len(loaded.errors) - 1
        warn(
            f"warning: {plain_error(loaded.errors[0]) if loaded.errors else config_path}"
            + (f" (and {more} more)" if more > 0 else "")
            + f"; if a daemon serves this folder it keeps its last good config; "
            f"`orchctl validate {config_path}` lists every problem"
        )
        raw = loaded.data.get("paths") if isinstance(loaded.data, dict) else None
        known = desired.PathsConfig.model_fields
        try:
            paths = desired.PathsConfig.model_validate(
                {k: v for k, v in raw.items() if k in known} if isinstance(raw, dict) else {}
            )
        except ValueError:
            paths = desired.PathsConfig()
    base = config_path.parent.resolve()  # orch.yaml's own folder, as the daemon's (a link
    results_dir = desired.resolve(base, paths.results)  # there is not followed elsewhere)
    try:
        store = results.ResultStore(results_dir)
    except OSError as exc:
        raise Refused(
            EXIT_USAGE,
            f"the results folder {results_dir} cannot be used: {exc.strerror or exc}",
            hint="fix paths.results in orch.yaml",
        ) from exc
    return _as_served(
        Folder(
            config_path=config_path,
            base=base,
            spool=spool.Spool(desired.resolve(base, paths.spool)),
            results=store,
            state_dir=desired.resolve(base, paths.state),
            paths=paths,
        )
    )


def _as_served(folder: Folder) -> Folder:
    """The folders the daemon serving here uses, where an edit of orch.yaml's `paths:` has
    not reached it yet (it takes them at its start): its tasks are there, not in the
    folders the edit names, until it restarts."""
    seen = probing.probe(folder.state_dir)
    served = seen.status.daemon.paths if seen.serving and seen.status is not None else None
    if not served:
        return folder
    spool_root, results_root = Path(served.get("spool", "")), Path(served.get("results", ""))
    if not spool_root.is_absolute() or not results_root.is_absolute():
        return folder
    if (spool_root, results_root) == (folder.spool.root.resolve(), folder.results.root.resolve()):
        return folder
    warn(
        f"warning: the daemon serving here (pid {seen.pid}) uses the folders it started with "
        f"(spool {spool_root}, results {results_root}) until it restarts; {folder.config_path}"
        " names others, so those it uses are read here"
    )
    return dataclasses.replace(
        folder, spool=spool.Spool(spool_root), results=results.ResultStore(results_root)
    )


# -- task ids --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """Where a task id is already in use in a folder: its result, or a file waiting for it."""

    task_id: str
    result_path: Path | None  # results/<id>.json, when it exists
    result: results.Result | None  # None when there is no result, or it cannot be read
    waiting: pending.Pending | None
    problem: str | None = None  # why the result file there cannot be read
    # with neither a result nor a waiting file: the event log an earlier task left (its
    # result file removed by hand); the daemon takes the id for that task's
    log_path: Path | None = None

    def describe(self, folder: Folder) -> str:
        if self.log_path is not None:
            return (
                f"{folder.shown(self.log_path)}: the event log of an earlier task, whose result "
                "file was removed"
            )
        if self.result_path is not None:
            status = self.result.status if self.result is not None else self.unreadable()
            return f"{folder.shown(self.result_path)}: {status}"
        assert self.waiting is not None
        where = folder.spool.root / self.waiting.folder / self.waiting.name
        doing = "waiting for the daemon" if self.waiting.folder == "incoming" else "claimed"
        return f"{folder.shown(where)}: {doing}"

    def unreadable(self) -> str:
        return f"unreadable ({plain_text(self.problem)})" if self.problem else "unreadable"


def path_arg(text: str) -> Path:
    """A path given on the command line (argparse's `type`): an empty one names nothing
    (Path("") would be the current folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return Path(text)


def http_url(text: str) -> str:
    """The daemon's address given with --url (argparse's `type`): refused as a usage error
    before the verb does anything (a submit that delivered the task first, then refused
    the URL, told the user nothing was sent)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// URL: give the daemon's address, e.g. "
            "--url http://127.0.0.1:8080, or leave --url out to use the one in "
            ".orch/status.json"
        )
    return text


def file_or_stdin(text: str) -> str:
    """A file argument that may be "-" for standard input (argparse's `type`): an empty one
    names nothing, as for `path_arg`."""
    path_arg(text)
    return text


def config_arg(text: str) -> Path:
    """An orch.yaml path given with --config (argparse's `type`): a file, so a name that
    ends in '/' (a folder) is refused, as is one that is not UTF-8 (its name is written
    into the files the daemon and `init` make)."""
    path = path_arg(text)
    if text.endswith("/"):
        raise argparse.ArgumentTypeError(
            f"{printable(text)} names a folder; give the file, e.g. {text}orch.yaml"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{printable(text)} is not valid UTF-8; rename it, e.g. orch.yaml"
        ) from None
    return path


def bind_arg(text: str) -> str:
    """A server.bind given on the command line (argparse's `type`): checked before a verb
    writes it into a starter orch.yaml (a bad one was written, then refused, and kept
    being served as written)."""
    problem = desired.bind_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def require_safe_id(task_id: str) -> None:
    if not ids.is_safe_id(task_id):
        raise Refused(
            EXIT_USAGE,
            f"{printable(task_id)} is not a task id",
            hint="task ids are 1 to 128 letters, digits, '.', '_' and '-' (no '..')",
        )


def lookup(folder: Folder, task_id: str) -> Known | None:
    """The task's result or waiting file, or None when this folder has never heard of it."""
    path = folder.results.path(task_id)
    if path.exists():
        result = folder.results.read(task_id)
        problem = folder.results.problem(task_id) if result is None else None
        return Known(task_id, path, result, None, problem)
    found = pending.find(folder.spool, task_id)
    if found is not None:
        return Known(task_id, None, None, found)
    log = folder.results.events_path(task_id)
    with contextlib.suppress(OSError):
        info = log.stat()
        if stat.S_ISREG(info.st_mode) and info.st_size > 0:  # as the daemon judges it
            return Known(task_id, None, None, None, log_path=log)
    return None


# -- plain text ------------------------------------------------------------------------------

_GOT = re.compile(r" \(got (.*)\)$", re.DOTALL)


def plain_error(error: loading.LoadError, *, warning: bool = False) -> str:
    """One loader error as a line without Python reprs: pydantic's "Value error, " prefix is
    dropped and a mapping or list that was given is named, not dumped."""
    message = error.message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    got = _GOT.search(message)
    # a list's or a mapping's repr starts with its bracket; a string's with its quote (a
    # string that holds a bracket, "a[b", is shown as it is)
    if got and got.group(1)[:1] in ("{", "["):
        kind = "a mapping" if got.group(1).startswith("{") else "a list"
        message = message[: got.start()] + f" (got {kind})"
    shown = loading.LoadError(
        error.path, error.line, error.column, error.field, message, error.hint
    )
    text = str(shown)
    if warning:  # "file:line:col: warning: field: message"
        where = str(loading.LoadError(error.path, error.line, error.column, None, ""))
        text = f"{where}warning: {text[len(where) :]}"
    return one_line(text)


def one_line(text: str) -> str:
    """`text` on one line, a byte of a file name that is not UTF-8 shown as `\\xe9` (as
    everywhere else a name is shown), never written raw to a terminal or a pipe."""
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text
    return undecodable_escaped(text)


def undecodable_escaped(text: str) -> str:
    """The bytes `os.fsdecode` kept as lone surrogates (U+DC80-U+DCFF), as `\\xNN`."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in text)


def plain_text(text: str) -> str:
    """Free text (an exception's message) on one line, without the quotes of a dict repr."""
    return one_line(text).replace("{'", "{").replace("'}", "}")


def printable(value: str) -> str:
    """A user-given string, quoted, with control characters escaped and its length bounded."""
    return ids.quoted(value)


def ago(seconds: float) -> str:
    """A rough age for people: "12 s", "4 min", "3 h", "2 days"."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


# -- numbers on the command line: refused by argparse (exit 2, naming the option) ------------


def seconds(text: str) -> float:
    """A duration over 0 (and finite): `--duration 0`, `-1` or `nan` would stop at once,
    never, or spin."""
    return _number(text, float, "a number of seconds over 0", lambda v: v > 0)


def seconds_or_zero(text: str) -> float:
    return _number(text, float, "a number of seconds, 0 or more", lambda v: v >= 0)


def count(text: str) -> int:
    return _number(text, int, "a whole number, 0 or more", lambda v: v >= 0)


def positive(text: str) -> int:
    return _number(text, int, "a whole number, 1 or more", lambda v: v >= 1)


N = TypeVar("N", int, float)


def _number(text: str, kind: type[N], what: str, ok: Callable[[N], bool]) -> N:
    if len(text) > 20 and text.strip().lstrip("+-").isdigit():  # a number, just too long
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is too large (over 20 digits): give {what}"
        )
    try:
        value = kind(text) if len(text) <= 20 else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}")
    return value
