"""The task verbs of `orchctl`: `submit`, `cancel` and `tasks` (`watch` is in `cli_watch`).

Each checks what it can before it writes anything: `submit` refuses a task file that would be
quarantined for its name or its id (DUPLICATE_TASK_ID) before delivering it, and says at once
when no daemon serves the folder; `cancel` writes a request only for a task that is waiting
or running, so a request can never lie in wait for a later task of the same name.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reconciler import api_client, cli_common, cli_sse, cli_watch, logs, probing
from reconciler.cli_common import EXIT_ENV, EXIT_FAILED, EXIT_OK, EXIT_USAGE, Refused
from state import loading, pending, spool, tasks
from state.results import id_reusable

# -- submit ----------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    data, shown, is_json = _read_input(args.file)
    text, problems = loading.decode_utf8(data, shown)
    checked = (
        loading.validate_text(text, tasks.TaskFile, shown=shown, is_json=is_json)
        if text is not None
        else loading.Loaded(None, problems)
    )
    if checked.value is None or text is None:
        for problem in checked.errors:
            print(cli_common.plain_error(problem), file=sys.stderr)
        return EXIT_USAGE
    task = checked.value
    suffix = ".task.json" if is_json else ".task.yaml"
    if task.task_id is not None:
        task_id = task.task_id
    elif args.file == "-":  # nothing names it: give it a unique id, written into the file
        task_id = spool.unique_name("stdin").replace(".", "-")[:100]
        parsed = json.loads(text) if is_json else yaml.safe_load(text)
        parsed["task_id"] = task_id
        data, suffix = json.dumps(parsed).encode(), ".task.json"
    else:
        unsafe = tasks.implied_id_problem(shown, Path(args.file).name)
        if unsafe is not None:
            print(cli_common.plain_error(unsafe), file=sys.stderr)
            return EXIT_USAGE
        task_id = tasks.stem(Path(args.file).name)
    known = cli_common.lookup(folder, task_id)
    # a task refused at the door, or ended with a retriable error (a drop-lru eviction), may
    # be submitted again under its id: the daemon lets the new one take it over
    retry = known is not None and known.result is not None and id_reusable(known.result)
    if known is not None and not retry:
        raise Refused(
            EXIT_FAILED,
            f"task id {cli_common.printable(task_id)} is already used "
            f"({known.describe(folder)}) — DUPLICATE_TASK_ID",
            hint="give the task a new task_id",
        )
    name = f"{task_id}{suffix}"
    try:
        # a file whose id is its name must keep that name: renamed, it would be another task
        target, identity = spool.deliver_file(
            folder.spool, data, name=name, exact=task.task_id is None
        )
    except ValueError as exc:  # a name the spool would refuse (too long, hidden, …)
        raise Refused(EXIT_USAGE, str(exc), hint="set task_id: in the file") from None
    except FileExistsError:
        raise Refused(
            EXIT_FAILED,
            f"{folder.shown(folder.spool.incoming / name)} is taken by a waiting file of "
            f"another task; yours has no task_id, so its name is its id ({task_id}) and it "
            "cannot be delivered under another; nothing was delivered",
            hint=f"add `task_id: {task_id}` to the file (or rename it), then submit again",
        ) from None
    except OSError as exc:  # a full disk, a read-only one: nothing was delivered
        raise Refused(
            EXIT_ENV,
            f"cannot deliver {cli_common.printable(args.file)} into "
            f"{folder.shown(folder.spool.incoming)}: {exc.strerror or exc}",
            hint="make room on (or fix) the spool's disk, then submit again",
        ) from None
    result_path = folder.results.path(task_id)
    cli_common.did(f"{task_id} is delivered to {folder.shown(target)}")
    if not args.json:
        print(f"submitted {task_id} → {folder.here(target)}")
        print(f"result: {folder.here(result_path)}", flush=True)
    seen = probing.probe(folder.state_dir)
    stopping = seen.serving and seen.status is not None and seen.status.daemon.stopping_since
    if not seen.serving or stopping:
        cli_common.warn(
            f"the daemon (pid {seen.pid}) is stopping: the task will run at its next start"
            if stopping
            else "no daemon is serving this folder: the task will run when "
            f"`{folder.serve_command()}` starts"
        )
        if args.wait:
            return EXIT_ENV
    if not args.wait:
        if args.json:
            record = {"task_id": task_id, "file": str(target), "result": str(result_path)}
            print(json.dumps(record))
        return EXIT_OK
    # follow this file's task, not another one of its id: a rejection whose id it reuses,
    # or another submitter's file of the same id that the daemon took first
    _until_own(folder, task_id, target.name, identity, args.timeout)
    printer = cli_watch.Printer(ends=False, quiet=args.json)
    ended = cli_watch.follow(
        folder,
        task_id,
        printer,
        timeout_s=args.timeout,
        url=cli_watch.source_url(folder, args.url),
        token=cli_sse.token_from(args.token_env),
    )
    printer.newline()
    if args.json:
        result = ended.result.model_dump(mode="json") if ended.result is not None else None
        print(logs.writable(json.dumps(result, indent=2, ensure_ascii=False)))
    else:
        print(cli_watch.summary(ended))
    return EXIT_OK if ended.succeeded else EXIT_FAILED


def _until_own(
    folder: cli_common.Folder, task_id: str, name: str, identity: tuple[int, int], timeout_s: float
) -> None:
    """Wait until the daemon has taken the delivered file (`identity`: the daemon links and
    renames that very file) in as task `task_id`: its result names this file. Raise, with
    the daemon's reason, where the daemon refused the file instead (a task of that id came
    first: DUPLICATE_TASK_ID, written beside the file in spool/failed/)."""
    deadline = time.monotonic() + timeout_s
    the_spool = folder.spool
    while True:
        result = folder.results.read(task_id)
        if result is not None and _names(the_spool, result.source_file, identity):
            return
        waiting = any(
            _is(path, identity) for path in (the_spool.incoming / name, the_spool.active / name)
        )
        if not waiting:
            refused = _refused_as(the_spool, name, identity)
            if refused is not None:
                code, message, hint = _record(refused)
                raise Refused(
                    EXIT_FAILED,
                    f"{folder.shown(refused.with_name(refused.name[: -len('.error.json')]))} "
                    f"was refused — {code}: {message}",
                    hint=hint or f"see {folder.shown(refused)}",
                )
        if time.monotonic() >= deadline:
            raise Refused(EXIT_FAILED, f"timed out waiting for task {task_id} to be taken in")
        seen = probing.probe(folder.state_dir)
        if not seen.serving:
            raise Refused(EXIT_ENV, "the daemon stopped before it took the task in")
        if not seen.responding(time.time()) and seen.written_at is not None:
            raise Refused(  # stopped by a signal, hung on a disk: as `watch` says it
                EXIT_ENV,
                f"the daemon (pid {seen.pid}) has not responded for "
                f"{cli_common.ago(time.time() - seen.written_at)}: task {task_id} waits in "
                f"{folder.shown(the_spool.incoming / name)} and is taken in when the "
                "daemon goes on",
                hint="`orchctl status` shows it; restart the daemon if it is hung",
            )
        time.sleep(cli_watch.POLL_S)


def _is(path: Path, identity: tuple[int, int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == identity


def _names(the_spool: spool.Spool, source_file: str | None, identity: tuple[int, int]) -> bool:
    """Whether a result's `source_file` (spool/<folder>/<name>) is the file `identity`."""
    parts = (source_file or "").split("/")
    if len(parts) != 3 or parts[0] != "spool" or parts[1] in ("", ".", ".."):
        return False
    return _is(the_spool.root / parts[1] / parts[2], identity)


def _record(path: Path) -> tuple[str, str, str | None]:
    """The code, message and hint of a refusal's error record (printable; what it lacks
    is said so)."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return "refused", f"its error record {path.name} cannot be read", None
    code, message, hint = (record.get(k) for k in ("code", "message", "hint"))
    return (
        cli_common.plain_text(str(code or "refused")),
        cli_common.plain_text(str(message or "no reason given")),
        cli_common.plain_text(str(hint)) if hint else None,
    )


def _refused_as(the_spool: spool.Spool, name: str, identity: tuple[int, int]) -> Path | None:
    """The error record of the file `identity` in spool/failed/ (filed as `name`, or under a
    time-stamped variant of it), or None."""
    try:
        with os.scandir(the_spool.failed) as entries:
            candidates = [e.name for e in entries if e.name.endswith(name)]
    except OSError:
        return None
    for candidate in candidates:
        if _is(the_spool.failed / candidate, identity):
            return the_spool.failed / f"{candidate}.error.json"
    return None


def _read_input(name: str) -> tuple[bytes, str, bool]:
    """The task file's bytes (at most the spool's limit), how to name it, and whether it is
    JSON. Standard input for "-"; never follows a FIFO or device into a hang."""
    limit = loading.MAX_FILE_BYTES
    if name == "-":
        if sys.stdin is None:  # started with standard input closed (`<&-`): nothing to read
            raise Refused(
                EXIT_USAGE,
                "standard input is closed: there is no task to read from it",
                hint="pipe the task in (`orchctl submit - < task.yaml`), or name its file",
            )
        try:
            data = sys.stdin.buffer.read(limit + 1)
        except OSError as exc:  # closed, or not readable (EBADF, EISDIR)
            raise Refused(
                EXIT_USAGE,
                f"standard input cannot be read: {exc.strerror or exc}",
                hint="pipe the task in (`orchctl submit - < task.yaml`), or name its file",
            ) from None
        shown, is_json = "<stdin>", data.lstrip().startswith(b"{")
    else:
        # a name that is not UTF-8 shown with its bytes as \xe9, as the daemon shows it
        path, shown = Path(name), spool.shown(name)
        is_json = path.suffix == ".json"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise Refused(EXIT_USAGE, f"{shown}: no such file") from None
        except OSError as exc:
            raise Refused(EXIT_USAGE, f"{shown}: cannot be read: {exc.strerror or exc}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
                raise Refused(EXIT_USAGE, f"{shown}: is {kind}, not a task file")
            with os.fdopen(os.dup(fd), "rb") as fh:
                data = fh.read(limit + 1)
        finally:
            os.close(fd)
    if len(data) > limit:
        raise Refused(
            EXIT_USAGE,
            f"{shown}: is over the limit of {limit} bytes",
            hint="keep task files small; put large inputs in a file the prompt names",
        )
    return data, shown, is_json


# -- cancel ----------------------------------------------------------------------------------


def cmd_cancel(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    task_id = args.task_id
    cli_common.require_safe_id(task_id)
    known = cli_common.lookup(folder, task_id)
    if known is None:
        raise Refused(
            EXIT_FAILED,
            f"no task {cli_common.printable(task_id)} is queued, running or finished "
            "in this folder",
            hint="`orchctl tasks` lists them",
        )
    if known.result is not None and known.result.terminal:
        print(f"task {task_id} already {known.result.status}; nothing to cancel")
        return EXIT_OK
    if known.result is None and known.waiting is None:
        # its result file cannot be read, or is gone: the event log says whether it ended
        ended = cli_watch.ended_in_log(folder, task_id)
        if ended is not None:
            print(
                f"task {task_id} already ended ({ended} in its event log; "
                f"{known.describe(folder)}); nothing to cancel"
            )
            return EXIT_OK
        live = _daemon_holds(folder, task_id, url=args.url, token_env=args.token_env)
        if live is False:
            raise Refused(
                EXIT_FAILED,
                f"task {task_id} is neither queued nor running (the daemon serving this folder "
                f"holds no such task) and {known.describe(folder)}: nothing to cancel",
                hint=(
                    f"put the right {known.result_path.name} back, or remove it and "
                    f"{folder.results.events_path(task_id).name} to free the id"
                    if known.result_path is not None
                    else f"remove {folder.results.events_path(task_id).name} to free the id"
                ),
            )
        if live is None:
            cli_common.warn(
                f"warning: {known.describe(folder)}; the task has not ended in its event log, "
                "so it may still be queued or running: the cancel applies if it is"
            )
    spool.request_cancel(folder.spool, task_id)
    cli_common.did(f"the cancel of {task_id} is requested")
    print(f"cancel requested for {task_id} ({known.describe(folder)})")
    if not probing.probe(folder.state_dir).serving:
        cli_common.warn(
            "no daemon is serving this folder: the cancel applies when "
            f"`{folder.serve_command()}` starts"
        )
    return EXIT_OK


def _daemon_holds(
    folder: cli_common.Folder, task_id: str, *, url: str | None, token_env: str | None
) -> bool | None:
    """Whether the daemon serving the folder holds `task_id` live (queued or running), asked
    over its API; None when it cannot be asked."""
    base = cli_watch.source_url(folder, url)
    if base is None:
        return None
    try:
        client = api_client.Client(base, token=cli_sse.token_from(token_env), timeout_s=5.0)
        answer = client.get(f"/v1/tasks/{urllib.parse.quote(task_id)}")
    except api_client.Unreachable:
        return None
    body = answer.json
    if answer.status == 200 and isinstance(body, dict):
        return body.get("status") in ("queued", "running")
    if answer.status == 500 and answer.code == "INTERNAL":  # not live: its damaged file said
        return False
    return None


# -- tasks -----------------------------------------------------------------------------------

STATUSES = ("pending", "queued", "running", "succeeded", "failed", "canceled", "rejected")
UNREADABLE = "unreadable"  # a result file this orchctl cannot read: listed when not filtering


@dataclass(frozen=True)
class Row:
    task_id: str
    status: str
    pool_id: str | None
    tokens_out: int | None
    since: float  # when it was accepted (or its file written), seconds since the epoch

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "status": self.status,
            "pool_id": self.pool_id,
            "tokens_out": self.tokens_out,
            "age_s": round(max(0.0, now - self.since), 3),
        }


def cmd_tasks(args: argparse.Namespace) -> int:
    folder = cli_common.open_folder(args.config)
    wanted = set(args.status) if args.status else {*STATUSES, UNREADABLE}
    rows = recent(folder, wanted, limit=args.limit)
    now = time.time()
    if args.json:
        print(
            logs.writable(json.dumps([r.as_json(now) for r in rows], indent=2, ensure_ascii=False))
        )
        return EXIT_OK
    if not rows:
        which = f" {'/'.join(sorted(wanted))}" if args.status else ""
        print(f"no{which} tasks in this folder")
        return EXIT_OK
    width = max(8, *(len(r.task_id) for r in rows))
    # every column at least one space wider than its longest value: never run together
    # with no daemon, a queued or running result file says where its task stopped, not what
    # it is doing: marked, and said below
    stalled = (
        frozenset()
        if not any(r.status in LIVE for r in rows) or probing.probe(folder.state_dir).serving
        else LIVE
    )
    status_w = max(len(s) for s in (*STATUSES, UNREADABLE, "STATUS")) + 1 + bool(stalled)
    pool_w = max(15, *(len(r.pool_id or "-") for r in rows)) + 1
    print(f"{'ID':<{width}}  {'STATUS':<{status_w}}{'POOL':<{pool_w}}{'TOKENS':>7}  AGE")
    for r in rows:
        tokens = "" if r.tokens_out is None else str(r.tokens_out)
        status = f"{r.status}*" if r.status in stalled else r.status
        print(
            f"{r.task_id:<{width}}  {status:<{status_w}}{(r.pool_id or '-'):<{pool_w}}"
            f"{tokens:>7}  {cli_common.ago(now - r.since)}"
        )
    if stalled:
        print(
            "* no daemon is serving this folder: these tasks stopped there, and go on when "
            f"`{folder.serve_command()}` starts"
        )
    return EXIT_OK


LIVE = frozenset({"queued", "running"})


def recent(folder: cli_common.Folder, wanted: set[str], *, limit: int) -> list[Row]:
    """Tasks newest first (by their last change): waiting files and results, each result
    read only when it may be shown."""
    candidates: list[tuple[float, str, pending.Pending | None]] = []
    candidates += _result_files(folder)
    with_result = {task_id for _, task_id, _ in candidates}
    for file in pending.waiting(folder.spool):
        if file.task_id not in with_result:
            candidates.append((file.mtime, file.task_id or file.name, file))
    candidates.sort(key=lambda c: c[0], reverse=True)
    rows: list[Row] = []
    for mtime, task_id, waiting in candidates:
        if waiting is not None:  # in incoming/, or claimed a moment before its result exists
            row = Row(task_id, "pending", None, None, mtime)
        else:
            result = folder.results.read(task_id)
            if result is None:
                row = Row(task_id, UNREADABLE, None, None, mtime)
            else:
                since = probing.epoch(result.timings.accepted_at or "") or mtime
                tokens: int | None = result.tokens_out
                if result.status == "running":  # the result says 0 until the end: the log knows
                    tokens = _tokens_so_far(folder.results.events_path(task_id), tokens)
                row = Row(task_id, result.status, result.pool_id, tokens, since)
        if row.status in wanted:
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _tokens_so_far(log: Path, default: int | None) -> int | None:
    """A running task's tokens so far, from the last token or metrics frame of its event log
    (read from its end: a long log costs one small read)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
            lines = f.read().splitlines()
    except OSError:
        return default
    for raw in reversed(lines):
        try:
            frame = json.loads(raw)
            data = frame["data"]
            if frame["event"] == "token":
                return int(data["i"]) + 1
            if frame["event"] == "metrics":
                return int(data["tokens_out"])
        except (ValueError, KeyError, TypeError):
            continue  # the first line of the tail is cut; anything else odd is skipped
    return default


TAIL_BYTES = 16384


def _result_files(folder: cli_common.Folder) -> list[tuple[float, str, None]]:
    out = []
    try:
        with os.scandir(folder.results.root) as it:
            for entry in it:
                name = entry.name
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                task_id = name[: -len(".json")]
                try:
                    folder.results.path(task_id)  # a safe id, or not a result file
                    out.append((entry.stat(follow_symlinks=False).st_mtime, task_id, None))
                except (ValueError, OSError):
                    continue
    except OSError:
        return []
    return out
