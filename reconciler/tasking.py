"""One task's life in the daemon: its record, and the transitions that write its files.

Every transition writes the event frame first and the result file second (both before the
task file moves), so the stream and the file agree and the result file is the commit point:
a reader that sees a terminal result will find the terminal frame in the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler import clocks, fanout, logs
from state import events, results, spool, tasks
from state.errors import ErrorEnvelope

log = logs.get("tasks")

StatusName = results.StatusName  # (Books has a field named `results`)


@dataclass
class TaskRun:
    task_id: str
    task: tasks.TaskFile
    file_name: str  # the task file's name in spool/active/
    result: results.Result
    log: events.EventLog
    accepted_mono: float
    deadline_mono: float | None
    model_id: str
    pool_id: str | None
    cancel_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def priority(self) -> str:
        return self.task.priority


@dataclass
class Books:
    """Where task state is written: the spool, the results folder and the event fan-out."""

    spool: spool.Spool
    results: results.ResultStore
    hub: fanout.Hub
    clock: clocks.Clock

    def ts(self) -> str:
        return clocks.rfc3339(self.clock.now())

    def frame(self, run: TaskRun, event: events.EventName, data: dict[str, Any]) -> None:
        frame = run.log.append(event, data, ts=self.ts())
        self.hub.publish(run.task_id, frame)

    def save(self, run: TaskRun) -> None:
        self.results.write(run.result)

    def finish(
        self,
        run: TaskRun,
        status: StatusName,
        *,
        error: ErrorEnvelope | None = None,
        finish_reason: str | None = None,
    ) -> None:
        """Write the terminal frame, the terminal result, then move the task file out of active/."""
        now = self.clock.now()
        result = run.result
        result.status = status
        result.error = error
        result.finish_reason = finish_reason
        result.timings.finished_at = clocks.rfc3339(now)
        if not run.log.terminal:
            if error is not None:
                self.frame(run, "error", error.model_dump(mode="json"))
            else:
                self.frame(
                    run,
                    "end",
                    {
                        "tokens_out": result.tokens_out,
                        "decode_time_ms": result.timings.decode_time_ms,
                        "decode_ms": result.timings.decode_time_ms,
                        "finish_reason": finish_reason,
                    },
                )
        self.save(run)
        spool.finish(self.spool, run.file_name, failed=status in ("failed", "rejected"))
        logs.emit(
            log,
            f"task.{status}",
            f"Task {run.task_id} {status}"
            + (
                f": {error.code} {error.message}" if error else f" with {result.tokens_out} tokens."
            ),
            task_id=run.task_id,
            status=status,
            code=error.code if error else None,
            pool_id=result.pool_id,
            replica_id=result.replica_id,
        )


def new_result(
    task_id: str,
    task: tasks.TaskFile,
    *,
    events_path: Path,
    source: str,
    revision: str | None,
    accepted_at: str,
) -> results.Result:
    return results.Result(
        task_id=task_id,
        session_id=task.session_id,
        status="queued",
        model=task.model,
        pool_id=task.pool,
        seed=task.seed if task.seed is not None else tasks.default_seed(task_id),
        timings=results.Timings(accepted_at=accepted_at),
        config_revision=revision,
        events=str(events_path),
        source_file=source,
        labels=dict(task.labels),
    )
