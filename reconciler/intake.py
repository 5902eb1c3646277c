"""Claiming task files from spool/incoming/ and turning them into parsed tasks or quarantine.

Called by the daemon on every pass. Nothing here trusts the entry: its kind (a folder, a FIFO),
its name (not UTF-8, hidden, too long, control characters), size, encoding, links, syntax,
schema and the task id (which becomes a file name) are all checked, and any failure moves the
entry to spool/failed/ with an `.error.json` that names the line and field. Where a task id is
known and unused, a `rejected` result is written too, so an agent waiting on
results/<task_id>.json learns what happened. An entry that cannot even be claimed is
quarantined from incoming/: one entry's trouble is never the daemon's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import clocks, logs
from state import errors, events, ids, loading, results, spool, tasks
from state.errors import ErrorCode

log = logs.get("intake")


@dataclass(frozen=True)
class Parsed:
    task_id: str
    task: tasks.TaskFile
    file_name: str


def claim_all(
    *,
    the_spool: spool.Spool,
    store: results.ResultStore,
    names: list[str],
    clock: clocks.Clock,
    revision: str | None = None,
) -> list[Path]:
    """Claim the incoming/ entries `names` together (see `spool.claim_all`); an entry that can
    be neither linked nor renamed into active/ is quarantined from where it is, with the
    reason. Returns the claimed paths, in the order of `names`."""
    claimed: list[Path] = []
    for name, got in zip(names, spool.claim_all(the_spool, names), strict=True):
        if isinstance(got, Path):
            claimed.append(got)
        elif isinstance(got, OSError):
            _unclaimable(the_spool, store, name, got, clock, revision)
    return claimed


def _unclaimable(
    the_spool: spool.Spool,
    store: results.ResultStore,
    name: str,
    exc: OSError,
    clock: clocks.Clock,
    revision: str | None,
) -> None:
    source = the_spool.incoming / name
    problem = loading.LoadError(
        f"spool/incoming/{spool.shown(name)}",
        None,
        None,
        None,
        f"could not be claimed: {exc.strerror or exc}",
        "check the entry's owner and permissions; deliver task files with `orchctl submit`",
    )
    try:
        quarantine(
            the_spool=the_spool,
            store=store,
            path=source,
            problems=[problem],
            clock=clock,
            task_id=claimed_task_id(source, None),
            revision=revision,
        )
    except OSError as again:  # failed/ itself is unwritable: say so, keep serving
        logs.emit(
            log,
            "task.unclaimable",
            f"Could not claim or quarantine {spool.shown(name)}: {again}",
            level=40,
            file=spool.shown(name),
        )


def parse_claimed(path: Path) -> Parsed | list[loading.LoadError]:
    """Validate a claimed task file; the task id defaults to the file name's stem."""
    shown = f"spool/active/{spool.shown(path.name)}"
    problem = spool.name_problem(path.name)
    if problem is not None:
        return [
            loading.LoadError(
                shown,
                None,
                None,
                None,
                f"the file name {problem}",
                "rename it with letters, digits, '.', '_' and '-', e.g. fix-bug.task.yaml",
            )
        ]
    if not path.name.endswith(tasks.TASK_SUFFIXES):
        return [
            loading.LoadError(
                shown,
                None,
                None,
                None,
                "is not a task file (names end in .task.yaml, .task.yml or .task.json)",
                "rename it, e.g. fix-bug.task.yaml",
            )
        ]
    loaded = loading.load_model(path, tasks.TaskFile, shown=shown, tree=False)
    if loaded.value is None:
        return loaded.errors
    if loaded.value.task_id is None:
        unsafe = tasks.implied_id_problem(shown, path.name)
        if unsafe is not None:
            return [unsafe]
    task_id = loaded.value.task_id or tasks.stem(path.name)
    return Parsed(task_id, loaded.value, path.name)


def claimed_task_id(path: Path, data: Any) -> str | None:
    """The task id an invalid file was meant to have, when it is safe to use."""
    candidate = data.get("task_id") if isinstance(data, dict) else None
    if not isinstance(candidate, str):
        candidate = tasks.stem(path.name)
    return candidate if ids.is_safe_id(candidate) else None


def quarantine(
    *,
    the_spool: spool.Spool,
    store: results.ResultStore,
    path: Path,
    problems: list[loading.LoadError],
    clock: clocks.Clock,
    code: ErrorCode = ErrorCode.INVALID_TASK_FILE,
    task_id: str | None = None,
    revision: str | None = None,
    take_over: bool = False,
) -> None:
    """Move a refused task file to failed/ with its error record, and write the refusal as
    its task's result when the id is free. `take_over`: the file was just claimed from
    incoming/, so an id an earlier task left reusable (refused, or ended with an error that
    said to retry) is taken over by this refusal; a file handed back by recovery (its
    refusal cut short by a crash) keeps a result already there, which may be its own."""
    claimed_as = f"spool/active/{spool.shown(path.name)}"

    def explained(target: Path) -> tuple[list[loading.LoadError], errors.ErrorEnvelope]:
        # the problems name the file where it will be (failed/, maybe renamed), not where it
        # was read: a reader of the record or the result goes there
        where = f"spool/failed/{target.name}"
        placed = [
            dataclasses.replace(p, path=where) if p.path == claimed_as else p for p in problems
        ]
        # the envelope carries the first problem's hint: its message does not repeat it
        shown = [dataclasses.replace(placed[0], hint=None), *placed[1:10]]
        message = "; ".join(str(p) for p in shown)
        return placed, errors.envelope(code, message, hint=placed[0].hint or None)

    def record(target: Path) -> dict[str, Any]:
        placed, env = explained(target)
        first = placed[0]
        return {
            **env.model_dump(mode="json"),
            "path": first.path,
            "line": first.line,
            "column": first.column,
            "field": first.field,
            "problems": [p.as_dict() for p in placed],
            "task_id": task_id,
            "original_name": spool.shown(path.name),
        }

    def reject(target: Path) -> None:
        if task_id is None or code == ErrorCode.DUPLICATE_TASK_ID:
            return
        # an id in use keeps its result; one refused before or ended with an error that said
        # to retry is taken over (as a valid file sent again would take it): its result and
        # log then tell of this file's refusal, not the earlier one's
        if store.exists(task_id) and not (take_over and store.take_over(task_id)):
            return
        write_rejection(
            store=store,
            task_id=task_id,
            error=explained(target)[1],
            clock=clock,
            source=f"spool/failed/{target.name}",
            revision=revision,
        )

    moved = spool.quarantine(the_spool, path, record, before_move=reject)
    logs.emit(
        log,
        "task.quarantined",
        f"Moved {spool.shown(path.name)} to spool/failed/{moved.name}: {problems[0]}",
        level=30,
        task_id=task_id,
        code=code,
        file=moved.name,
    )


def write_rejection(
    *,
    store: results.ResultStore,
    task_id: str,
    error: errors.ErrorEnvelope,
    clock: clocks.Clock,
    source: str | None,
    revision: str | None,
    task: tasks.TaskFile | None = None,
) -> None:
    """A task refused before it was queued: the error frame, then a `rejected` result."""
    ts = clocks.rfc3339(clock.now())
    log_path = store.events_path(task_id)
    after = store.taken_over.pop(task_id, None)  # a log taken over: its ids go on after it
    event_log = (
        events.EventLog(log_path, new=True, after=after)
        if after is not None
        else events.EventLog(log_path)
    )
    if not event_log.terminal:
        event_log.append("error", error.model_dump(mode="json"), ts=ts)
    result = results.Result(
        task_id=task_id,
        status="rejected",
        error=error,
        events=str(log_path),
        source_file=source,
        config_revision=revision,
        timings=results.Timings(accepted_at=ts, finished_at=ts),
    )
    if task is not None:
        result.session_id = task.session_id
        result.model = task.model
        result.pool_id = task.pool
        result.labels = dict(task.labels)
    store.write(result)
