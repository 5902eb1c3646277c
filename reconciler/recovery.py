"""Crash recovery of tasks: what a restarted daemon does with the task files a crash left in
`spool/active/`, before its first pass; and, every few seconds while it serves, with those a
failed write (a full disk) left there without a live task (`owned` excludes the live ones).

Exactly-once completion, at-least-once execution. A task whose result is terminal is filed
and never re-run; so is one whose event log ends in a terminal frame (its result is rebuilt
from the log, the earlier commit). A second file with the same task id is refused with
`DUPLICATE_TASK_ID`. Every other task is handed back to the daemon (`take`) in its original
acceptance order, keeping its original result (attempts, deadline); it then waits for its pool
like any queued task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path

from reconciler import intake, logs, tasking
from state import atomic, events, results, spool
from state.errors import ErrorEnvelope

log = logs.get("recovery")

Take = Callable[[Path, results.Result | None], None]
Refuse = Callable[[Path, str], None]  # (path, task id): quarantine as DUPLICATE_TASK_ID


def recover(
    *,
    the_spool: spool.Spool,
    store: results.ResultStore,
    take: Take,
    refuse_duplicate: Refuse,
    revision: str | None,
    owned: Collection[str] = (),
) -> None:
    """Recover every task file in active/ except those `owned` (by live runs)."""
    for name in spool.complete_cut_claims(the_spool):
        logs.emit(log, "task.claim_completed", f"Completed the claim of {name} a crash cut short.")
    pending: list[tuple[str, Path, str | None, results.Result | None, str | None]] = []
    for name in spool.active_names(the_spool):
        if name in owned:
            continue
        try:
            left = _look(name, the_spool=the_spool, store=store, revision=revision)
        except OSError as exc:  # one task's files cannot be written: it waits, no other does
            logs.emit(
                log,
                "task.recovery_deferred",
                f"Could not recover spool/active/{name}: {exc}. It waits there and is tried "
                "again every 5 s: remove what is in the way at that path, or give the "
                "daemon's user write access to it.",
                level=30,
                path=str(exc.filename or ""),
            )
            continue
        if left is not None:
            pending.append(left)
    seen: set[str] = set()
    for _, path, task_id, existing, correlation in sorted(pending, key=lambda p: (p[0], p[1].name)):
        if task_id is not None and task_id in seen:
            refuse_duplicate(path, task_id)
            continue
        if task_id is not None:
            seen.add(task_id)
        if existing is not None:
            logs.emit(
                log,
                "task.recovered",
                f"Re-queued task {existing.task_id} interrupted while {existing.status}.",
                task_id=existing.task_id,
                correlation_id=correlation or existing.task_id,
            )
        take(path, existing)


def _look(
    name: str, *, the_spool: spool.Spool, store: results.ResultStore, revision: str | None
) -> tuple[str, Path, str | None, results.Result | None, str | None] | None:
    """One task file of active/: filed when its result or log is terminal (None), else what
    re-queueing it needs."""
    path = the_spool.active / name
    parsed = intake.parse_claimed(path)
    task_id = parsed.task_id if isinstance(parsed, intake.Parsed) else None
    # the id a request gave the task (X-Correlation-Id): every log line about it has it
    correlation = parsed.task.correlation_id if isinstance(parsed, intake.Parsed) else None
    existing = store.read(task_id) if task_id else None
    if (existing is None or not existing.terminal) and isinstance(parsed, intake.Parsed):
        with atomic.unit(task_id):  # a write that fails holds up this task only
            rebuilt = finished_in_log(
                parsed, existing, store=store, revision=revision, the_spool=the_spool
            )
        if rebuilt is not None:  # written (in a group: at its commit), and filed so
            logs.emit(
                log,
                "task.recovered",
                f"Task {task_id} was {rebuilt.status} by its event log: its result is written "
                "from the log and its task file filed.",
                task_id=task_id,
                correlation_id=correlation or task_id,
            )
            return None
    if existing is not None and existing.terminal:
        with atomic.unit(task_id):
            spool.finish(the_spool, name, failed=existing.status in ("failed", "rejected"))
        logs.emit(
            log,
            "task.recovered",
            f"Task {task_id} was already {existing.status}; filed its task file.",
            task_id=task_id,
            correlation_id=correlation or task_id,
        )
        return None
    if existing is not None and task_id is not None:
        # the event log is the truth: a crash after a `started` frame and before the
        # running result must not let the re-run reuse that attempt number
        started = sum(f.event == "started" for f in events.read(store.events_path(task_id)))
        existing.attempts = max(existing.attempts, started)
    key = existing.timings.accepted_at if existing and existing.timings.accepted_at else "~"
    return (key, path, task_id, existing, correlation)


def sweep(*folders: Path, shared: bool = False) -> None:
    """Remove the temporary files of writes a crash interrupted and the spare files of its
    rewrites (never a file a reader may see); `shared`: folders other daemons may write too
    (only the files of processes that are gone)."""
    for folder in folders:
        for name in atomic.sweep_leftovers(folder, shared=shared):
            logs.emit(
                log,
                "recovery.swept",
                f"Removed {folder.name}/{name}, a temporary file (a write a crash interrupted,"
                " or a spare kept for the next write) the last daemon left.",
            )


def finished_in_log(
    parsed: intake.Parsed,
    existing: results.Result | None,
    *,
    store: results.ResultStore,
    revision: str | None,
    the_spool: spool.Spool | None = None,
) -> results.Result | None:
    """A crash (or a failed write) after the terminal frame but before the result: rebuild
    the result from the log (the frame is the earlier commit), so the task is filed, not
    re-run. With `the_spool`, its task file is filed too, where the result says."""
    frames = list(events.read(store.events_path(parsed.task_id)))
    if not frames or not frames[-1].terminal:
        return None
    result = existing or tasking.new_result(
        parsed.task_id,
        parsed.task,
        events_path=store.events_path(parsed.task_id),
        source=f"spool/active/{parsed.file_name}",
        revision=revision,
        accepted_at=frames[0].ts,
    )
    starts = [i for i, f in enumerate(frames) if f.event == "started"]
    run = frames[starts[-1] if starts else 0 :]
    tokens = [f for f in run if f.event == "token"]
    result.text = "".join(str(f.data.get("t", "")) for f in tokens)
    if starts:  # what the last attempt's `started` frame says of where it ran
        started = frames[starts[-1]]
        result.attempts = max(result.attempts, len(starts))
        result.pool_id = started.data.get("pool_id") or result.pool_id
        result.replica_id = started.data.get("replica_id") or result.replica_id
        result.engine_version = started.data.get("engine_version") or result.engine_version
        result.engine = started.data.get("engine") or result.engine
        result.model = started.data.get("model") or result.model
        if isinstance(started.data.get("kv_warmth"), bool):
            result.kv_warmth = started.data["kv_warmth"]
        if isinstance(started.data.get("gpu"), dict) and result.gpu is None:
            with contextlib.suppress(ValueError):
                result.gpu = results.GpuRef.model_validate(started.data["gpu"])
        result.timings.started_at = result.timings.started_at or started.ts
        if tokens:
            result.timings.first_token_ms = _ms_between(started.ts, tokens[0].ts)
    last = frames[-1]
    if last.event == "end":
        reason = last.data.get("finish_reason")
        result.status = "canceled" if reason == "canceled" else "succeeded"
        result.finish_reason = reason
        result.tokens_out = int(last.data.get("tokens_out") or len(tokens))
        if last.data.get("prompt_tokens") is not None:
            result.prompt_tokens = int(last.data["prompt_tokens"])
        if last.data.get("decode_time_ms") is not None:
            result.timings.decode_time_ms = int(last.data["decode_time_ms"])
    else:
        result.status = "failed" if starts else "rejected"
        result.error = ErrorEnvelope.model_validate(last.data)
    result.timings.finished_at = last.ts
    filed = None
    if the_spool is not None:
        failed = result.status in ("failed", "rejected")
        filed = spool.filed_path(the_spool, parsed.file_name, failed=failed)
        result.source_file = f"spool/{filed.parent.name}/{filed.name}"
    store.write(result)
    if the_spool is not None:
        spool.finish(the_spool, parsed.file_name, target=filed)
    return result


def _ms_between(a: str, b: str) -> int | None:
    try:
        start = datetime.fromisoformat(a.replace("Z", "+00:00"))
        end = datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0, int((end - start).total_seconds() * 1000))
