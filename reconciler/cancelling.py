"""Cancel requests: the files in spool/cancel/, applied on every pass (after intake, before
dispatch, so a task canceled while still in incoming/ never starts).

Rules: a request is consumed only once its task's terminal result is written, so a crash
between acknowledging a cancel and finishing the task cannot lose it. A request names a task by
id alone, so it applies only to a task delivered no later than CANCEL_WINDOW_S after the
request was written (a cancel may race ahead of its task file by that much); a task first seen
later is a new task that happens to reuse the id, and the old request is dropped.
"""

from __future__ import annotations

from pathlib import Path

from reconciler import clocks, dispatch, intake, logs
from state import atomic, failpoints, ids, results, spool

log = logs.get("daemon")

CANCEL_WINDOW_S = 30.0  # how far a cancel request may race ahead of its task file


def apply(
    *,
    the_spool: spool.Spool,
    store: results.ResultStore,
    dispatcher: dispatch.Dispatcher,
    clock: clocks.Clock,
) -> None:
    """Apply the cancel requests in spool/cancel/. A request is consumed only once its
    task's terminal result is written, so a crash between acknowledging a cancel and
    finishing the task cannot lose it. A request names a task by id alone, so it applies
    only to a task delivered no later than CANCEL_WINDOW_S after the request was written
    (a cancel may race ahead of its task file by that much); a task first seen later is
    a new task that happens to reuse the id, and the old request is dropped."""
    now = clock.now()
    unsafe: list[str] = []
    ignored: list[str] = []
    names = spool.cancel_requests(the_spool, unsafe, ignored)
    _ignored(the_spool, ignored)
    for name in unsafe:
        logs.emit(
            log,
            "task.cancel_dropped",
            f"Dropped the cancel request spool/cancel/{logs.writable(name)[:140]}: its name is "
            "not a task id (1 to 128 letters, digits, '.', '_' and '-'; name the file after "
            "the task's id).",
            level=30,
        )
    for name in names:
        task_id = ids.TaskId(name)
        if not atomic.exists(the_spool.cancel / task_id, folder=False):
            continue  # consumed or dropped by an earlier pass, its removal not landed yet
        written = _mtime(the_spool.cancel / task_id)
        if written is None:
            continue
        run = dispatcher.runs.get(task_id)
        if run is not None:
            delivered = _mtime(the_spool.active / run.file_name) or now
            if delivered > written + CANCEL_WINDOW_S:
                _drop(the_spool, task_id, "its task arrived after the request's window")
                continue
            if not run.cancel_requested:  # said once, before what it brings about is said
                logs.emit(log, "task.cancel", f"Cancel of task {task_id} requested.", **run.log_ids)
            if dispatcher.cancel(task_id):
                failpoints.hit("after_cancel_ack")
            if run.result.terminal:  # a queued task is finished at once
                _consume(the_spool, task_id)
            continue  # a running one: consumed once its canceled result is written
        existing = store.read(task_id) if store.exists(task_id) else None
        if existing is not None and existing.terminal:
            _consume(the_spool, task_id)
            # not `task.canceled` again (said when the task ended: counting those counts each
            # cancel once), and with the request's correlation id, as every line of the task
            correlation = _correlation(the_spool, existing)
            if existing.status == "canceled":
                logs.emit(
                    log,
                    "task.cancel_consumed",
                    f"Cancel request for task {task_id} consumed: the task ended canceled.",
                    task_id=task_id,
                    correlation_id=correlation,
                )
            else:
                logs.emit(
                    log,
                    "task.cancel_dropped",
                    f"Dropped the cancel request for {task_id}: it already ended "
                    f"({existing.status}).",
                    task_id=task_id,
                    correlation_id=correlation,
                )
        elif now - written > CANCEL_WINDOW_S:
            _drop(the_spool, task_id, f"no task {task_id!r} arrived within its window")


def _correlation(the_spool: spool.Spool, result: results.Result) -> str:
    """The correlation id of an ended task, from its filed task file (the result has none),
    else its id."""
    filed = result.source_file or ""
    if filed.startswith("spool/"):
        path = the_spool.root / filed.removeprefix("spool/")
        # its move out of active/ may still wait in this pass's commit
        for where in (path, the_spool.active / path.name):
            parsed = intake.parse_claimed(where)
            if isinstance(parsed, intake.Parsed):
                return parsed.task.correlation_id or result.task_id
    return result.task_id


def waiting_for(
    the_spool: spool.Spool,
    task_id: str,
    file_name: str,
    now: float,
    listed: frozenset[str] | None = None,
) -> bool:
    """Whether a cancel request in spool/cancel/ applies to the task `task_id` being taken
    from active/`file_name` now (the window of `apply`): one written before its task file,
    or acknowledged by a daemon killed before its canceled result was durable. `listed`:
    the names in spool/cancel/ read for the whole batch (an id not among them is looked up
    no further: a lookup per task cost a burst as much as the rest of its check)."""
    if listed is not None and task_id not in listed:
        return False
    written = _mtime(the_spool.cancel / task_id)
    if written is None:
        return False
    delivered = _mtime(the_spool.active / file_name) or now
    return delivered <= written + CANCEL_WINDOW_S


# per spool: the entries of its cancel/ that are no request (a folder, a link), said once
# while they are there
_told: dict[Path, set[str]] = {}


def _ignored(the_spool: spool.Spool, names: list[str]) -> None:
    """Say once of each entry of spool/cancel/ that is no request (left for the user: it is
    not the daemon's to remove) that it is ignored."""
    told = _told.setdefault(the_spool.root, set())
    for name in names:
        if name not in told:
            logs.emit(
                log,
                "task.cancel_ignored",
                f"Ignoring spool/cancel/{logs.writable(name)[:140]}: it is not a plain file "
                "(a folder or a link), so no cancel request; remove it, and write an empty "
                "file named after the task's id to cancel that task.",
                level=30,
            )
    told.intersection_update(names)
    told.update(names)


def _consume(the_spool: spool.Spool, task_id: str) -> None:
    """Remove the request once its task's terminal result is written: as one of the task's
    own writes (`atomic.unit`), so that where that result fails at its commit, or a write of
    the task before it did, the request stays and is applied again."""
    with atomic.unit(task_id):
        spool.consume_cancel(the_spool, task_id)


def _drop(the_spool: spool.Spool, task_id: str, why: str) -> None:
    spool.consume_cancel(the_spool, task_id)
    logs.emit(
        log,
        "task.cancel_dropped",
        f"Dropped the cancel request for {task_id}: {why} ({CANCEL_WINDOW_S:.0f} s).",
        task_id=task_id,
    )


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
