"""One task's life in the daemon: its record, and the transitions that write its files.

Every transition writes the event frame first and the result file second (both before the
task file moves), so the stream and the file agree and the result file is the commit point:
a reader that sees a terminal result will find the terminal frame in the log.

Group commit: in the event loop, the durable writes of every task that changes state within
COMMIT_WINDOW_S join one `atomic` group, committed with a few syncs in all (a thousand tasks
finishing, starting or being queued together do not pay five fsyncs each). The commit (syncs
and renames) runs in a writer thread of its own, which hands it to the daemon's commit helper
process where there is one (`committer`, state/committer.py), one group at a time and in
order, so no loop turn waits on the disk: while one group is being committed the next one
collects writes, and is handed to the writer once the first has landed. The files appear at
the commit, in the order written; `settled()` waits for it, where a step must not run before
its writes are durable (no token frame is written before the running result is on disk), and
`landing()` gives the same as a future.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from reconciler import clocks, fanout, logs
from state import atomic, events, failpoints, ids, results, spool, tasks
from state.errors import ErrorEnvelope
from state.results import Budgets

log = logs.get("tasks")

StatusName = results.StatusName  # (Books has a field named `results`)


class LogIds(TypedDict):
    task_id: str
    correlation_id: str


@dataclass
class TaskRun:
    task_id: ids.TaskId
    task: tasks.TaskFile
    file_name: str  # the task file's name in spool/active/
    result: results.Result
    log: events.EventLog
    accepted_mono: float
    deadline_mono: float | None
    model_id: ids.ModelId
    pool_id: ids.PoolId | None
    cancel_requested: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # while not None: its engine ended before its running result was durable, so its frames
    # are held back for the commit that writes its end (published once that has landed)
    held: list[events.EventFrame] | None = None

    @property
    def priority(self) -> str:
        return self.task.priority

    @property
    def log_ids(self) -> LogIds:
        """The ids every log line about the task carries: its id, and the correlation id a
        request gave it (X-Correlation-Id), else the task id."""
        return LogIds(task_id=self.task_id, correlation_id=self.task.correlation_id or self.task_id)


Tap = Callable[[TaskRun, list[events.EventFrame]], None]  # the frames of one write


@dataclass
class _Waiter:
    """One `settled` call: its task (None: all), and how many of its groups have to land."""

    unit: str | None
    future: asyncio.Future[None]
    groups: int
    error: Exception | None = None


# How long a group commit collects task writes, across loop turns, before its syncs: with 8
# streams busy, one loop turn held a write or two, and the syncs of ~700 commits per 1,000
# tasks were a tenth of the loop's time; a task's tokens wait at most this much longer for
# its running result to be durable.
COMMIT_WINDOW_S = 0.002


@dataclass
class Books:
    """Where task state is written: the spool, the results folder and the event fan-out.

    `taps` (the Prometheus counters, reconciler/metrics.py) see every frame with its run:
    the run carries what a frame does not (priority, engine, status), and the result file
    cannot be read for it, since the frame is written before the result. `finished` is told
    of every task whose terminal result is written (the trace writer)."""

    spool: spool.Spool
    results: results.ResultStore
    hub: fanout.Hub
    clock: clocks.Clock
    taps: list[Tap] = field(default_factory=list)
    finished: Callable[[TaskRun], None] | None = None
    # told of each task whose writes failed at a commit (the taker holds back a queued one)
    write_failed: Callable[[str, Exception], None] | None = None
    # what carries out a group's commit for the commit thread (the daemon's commit helper
    # process, state/committer.py); None: the commit thread itself
    committer: Callable[[atomic.Group], None] | None = None
    _pending: atomic.Group | None = field(default=None, init=False, repr=False)
    # the group in the commit thread, and its commit's future
    _flying: tuple[atomic.Group, concurrent.futures.Future[None]] | None = field(
        default=None, init=False, repr=False
    )
    _overdue: bool = field(default=False, init=False, repr=False)  # _pending's window passed
    # per group (serial): the waiters of `settled`, each resolved once all its groups landed
    _waiting: dict[int, list[_Waiter]] = field(default_factory=dict, init=False, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _writer: concurrent.futures.ThreadPoolExecutor | None = field(
        default=None, init=False, repr=False
    )
    # the serial of the last group settled: groups land in the order they were begun
    _last_settled: int = field(default=-1, init=False, repr=False)

    @contextlib.contextmanager
    def _batch(self, task_id: str) -> Iterator[None]:
        """Durable writes of one task joined to the pending group commit, which the first of
        them schedules COMMIT_WINDOW_S ahead (at once without a loop). They are the task's
        unit: a write of another task that fails at the commit does not fail them."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with atomic.group(), atomic.unit(task_id):
                yield
            return
        group = atomic.begin()
        if group is not self._pending:
            self._pending, self._overdue = group, False
            self._timer = loop.call_later(COMMIT_WINDOW_S, self._due, group)
        with atomic.group(), atomic.unit(task_id):
            yield

    def _due(self, group: atomic.Group) -> None:
        """`group`'s window has passed: hand it to the writer, or once the group the writer
        holds has landed (meanwhile it collects more writes, for the same syncs)."""
        if group is not self._pending:  # flushed already
            return
        if self._flying is not None:
            self._overdue = True
            return
        self._launch(group)

    def _launch(self, group: atomic.Group) -> None:
        self._pending, self._overdue = None, False
        atomic.hand_off(group)
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "task-commit")
        loop = asyncio.get_running_loop()
        handed = self._writer.submit(atomic.commit, group, self.committer)
        self._flying = (group, handed)

        def landed(future: concurrent.futures.Future[None]) -> None:  # in the writer thread
            with contextlib.suppress(RuntimeError):  # the loop closed: `flush` settled it
                loop.call_soon_threadsafe(self._landed, group, future)

        handed.add_done_callback(landed)

    def _landed(self, group: atomic.Group, future: concurrent.futures.Future[None]) -> None:
        """The writer has committed `group` (or failed to): tell its waiters, then hand it
        the next group if that one's window has passed."""
        self._settle(group, future.exception())
        if self._flying is not None and self._flying[0] is group:
            self._flying = None
        if self._pending is not None and self._overdue:
            self._launch(self._pending)

    def _settle(self, group: atomic.Group, error: BaseException | None) -> None:
        if group.serial <= self._last_settled:  # settled already (`flush`)
            return
        self._last_settled = group.serial
        waiters = self._waiting.pop(group.serial, [])
        failures = self._failures(error, waiters, group)
        for key, failure in failures.items():
            if not isinstance(key, str):
                continue
            pending = self._pending
            if pending is not None and key in pending.units:  # its writes that followed
                pending.poisoned[key] = (
                    failure if isinstance(failure, OSError) else OSError(str(failure))
                )
            if self.write_failed is not None and key not in group.poisoned:
                try:
                    self.write_failed(key, failure)
                except Exception:  # the task waits for the recovery pass all the same
                    log.exception("handling the failed write of %s failed", key)
        for waiter in waiters:
            if waiter.unit in failures and waiter.error is None:
                waiter.error = failures[waiter.unit]
            waiter.groups -= 1
            if waiter.groups == 0 and not waiter.future.done():
                if waiter.error is not None:
                    waiter.future.set_exception(waiter.error)
                else:
                    waiter.future.set_result(None)

    @staticmethod
    def _failures(
        error: BaseException | None, waiters: list[_Waiter], group: atomic.Group
    ) -> dict[Any, Exception]:
        """Per unit (None: every waiter), the error its writes failed with in a commit."""
        if error is None:
            return {}
        if isinstance(error, atomic.GroupFailed):  # some tasks' writes failed: not the others'
            for key, failure in error.failures.items():
                if key not in group.poisoned:  # said when its first write failed
                    write_deferred(key, failure)
            return dict(error.failures)
        if not isinstance(error, Exception):
            error = RuntimeError(f"the group commit ended with {error!r}")
        log.error("group commit failed", exc_info=error)  # the disk refused (full, gone)
        return {w.unit: error for w in waiters} | {None: error}

    def flush(self) -> None:
        """Commit what is pending now, and wait for the writer (the daemon stopping: no later
        loop turn may come)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._flying is not None:
            flying, handed = self._flying
            with contextlib.suppress(Exception):
                handed.result()
            self._settle(flying, handed.exception())
            self._flying = None
        if self._pending is not None:
            group, self._pending = self._pending, None
            error: BaseException | None = None
            try:
                atomic.commit(group, self.committer)
            except Exception as exc:
                error = exc
            self._settle(group, error)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    async def settled(self, task_id: str | None = None) -> None:
        """Return once `task_id`'s writes made so far are durable (without one: every task
        write made so far); raise when they failed (without one: when writes of no task
        failed). A task does not wait for the commits of other tasks' writes."""
        future = self.landing(task_id)
        if future is not None:
            await future

    def landing(self, task_id: str | None) -> asyncio.Future[None] | None:
        """A future resolved once the groups pending and in flight that hold `task_id`'s
        writes (without one: any) have landed; None when there are none."""
        flying = self._flying[0] if self._flying is not None else None
        groups = [
            g
            for g in (flying, self._pending)
            if g is not None and (task_id is None or task_id in g.units)
        ]
        if not groups:
            return None
        waiter = _Waiter(task_id, asyncio.get_running_loop().create_future(), len(groups))
        for group in groups:
            self._waiting.setdefault(group.serial, []).append(waiter)
        return waiter.future

    def ts(self) -> str:
        return clocks.rfc3339(self.clock.now())

    def frame(self, run: TaskRun, event: events.EventName, data: dict[str, Any]) -> None:
        self.frames(run, event, [data])

    def frames(self, run: TaskRun, event: events.EventName, items: list[dict[str, Any]]) -> None:
        """Frames of one kind that arrived together, written to the log in one write (while
        the run holds its frames back: left to its commit, and published once that landed)."""
        held = run.held
        if held is None:
            written = run.log.extend(event, items, ts=self.ts())
            self.hub.publish(run.task_id, *written)
        else:
            with self._batch(run.task_id):
                written = run.log.extend(event, items, ts=self.ts(), held=True)
            held.extend(written)
        for tap in self.taps if written else ():
            try:
                tap(run, written)
            except Exception:  # counting must never stop a task
                log.exception("a frame tap failed on %s %s", run.task_id, event)

    def save(self, run: TaskRun) -> None:
        with self._batch(run.task_id):
            self.results.write(run.result)

    def queued(
        self,
        run: TaskRun,
        *,
        position: int,
        predicted_start_ms: int | None,
        on_time_probability: float | None,
        budgets: Budgets | None = None,
    ) -> None:
        """The task is admitted: its `queued` frame, then its result (one commit: a new log's
        first frame is written by the commit thread, just before the result)."""
        result = run.result
        result.status = "queued"
        result.queue_position = position
        result.predicted_start_ms = predicted_start_ms
        result.on_time_probability = on_time_probability
        result.budgets = budgets
        with self._batch(run.task_id):
            self.frame(
                run,
                "queued",
                {
                    "queue_position": position,
                    "predicted_start_ms": predicted_start_ms,
                    "on_time_probability": on_time_probability,
                    "attempt": result.attempts,
                    "budgets": None if budgets is None else budgets.model_dump(),
                },
            )
            self.save(run)
        when = (
            f"predicted start in {predicted_start_ms} ms"
            if predicted_start_ms is not None
            else "start not predictable until a replica is up"
        )
        logs.emit(
            log,
            "task.queued",
            f"Queued task {run.task_id} for {run.model_id} at position {position}; {when}.",
            **run.log_ids,
            queue_position=position,
            predicted_start_ms=predicted_start_ms,
            on_time_probability=on_time_probability,
            priority=run.priority,
        )

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
        with self._batch(run.task_id):  # the terminal frame's sync is the commit's
            if not run.log.terminal:
                if error is not None:
                    self.frame(run, "error", error.model_dump(mode="json"))
                else:
                    end: dict[str, Any] = {
                        "tokens_out": result.tokens_out,
                        "decode_time_ms": result.timings.decode_time_ms,
                        "decode_ms": result.timings.decode_time_ms,
                        "finish_reason": finish_reason,
                    }
                    if result.prompt_tokens is not None:
                        end["prompt_tokens"] = result.prompt_tokens
                    self.frame(run, "end", end)
                failpoints.hit("after_terminal_frame")
            # the result names where its task file is filed, as it will be once moved; a
            # file someone removed from active/ meanwhile is filed nowhere, and said so
            filed: Path | None = None
            if atomic.exists(self.spool.active / run.file_name, folder=False):
                filed = spool.filed_path(
                    self.spool, run.file_name, failed=status in ("failed", "rejected")
                )
            result.source_file = f"spool/{filed.parent.name}/{filed.name}" if filed else None
            self.save(run)
            failpoints.hit("before_task_filed")
            if filed is not None:
                spool.finish(self.spool, run.file_name, target=filed)
            failpoints.hit("after_task_filed")
        if filed is None:
            logs.emit(
                log,
                "task.file_gone",
                f"spool/active/{spool.shown(run.file_name)} was removed while task "
                f"{run.task_id} was live: its result names no task file. Leave the files of "
                "spool/active/ to the daemon (`orchctl cancel` stops a task).",
                level=30,
                **run.log_ids,
            )
        logs.emit(
            log,
            f"task.{status}",
            f"Task {run.task_id} {status}"
            + (
                f": {error.code} {error.message}" if error else f" with {result.tokens_out} tokens."
            ),
            **run.log_ids,
            status=status,
            code=error.code if error else None,
            pool_id=result.pool_id,
            replica_id=result.replica_id,
            # the numbers of the human text as fields, for a log query (jq, Loki)
            tokens_out=result.tokens_out,
            queue_ms=result.timings.queue_ms,
            first_token_ms=result.timings.first_token_ms,
            decode_time_ms=result.timings.decode_time_ms,
        )
        if run.held is not None:
            self._publish_landed(run, run.held)
            run.held = None
        if self.finished is not None:  # after the commit point: never delays or blocks it
            self.finished(run)

    def _publish_landed(self, run: TaskRun, frames: list[events.EventFrame]) -> None:
        """Publish a task's held frames once the commit that writes them has landed (a
        frame is published once the log has it). Where a write of the task failed in that
        commit, those of them its log has (the frames are appended before the result is
        renamed): the recovery pass then finishes the task from its log, or runs it again
        after its last frame there, and a reader waiting for the end gets it either way."""
        future = self.landing(run.task_id)
        if future is None:
            self.hub.publish(run.task_id, *frames)
            return

        def landed(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is None:
                self.hub.publish(run.task_id, *frames)
                return
            first = frames[0].id if frames else 0
            try:
                logged = [f for f in events.read(run.log.path) if f.id >= first]
            except (OSError, ValueError):  # no log to read: nothing of them is known there
                return
            self.hub.publish(run.task_id, *logged)

        future.add_done_callback(landed)


def write_deferred(
    task_id: Any, error: BaseException, *, correlation_id: str | None = None
) -> None:
    """Log a task write that failed for the machine (a full disk, a folder in the way): the
    task waits in spool/active/ and the recovery pass tries it again."""
    fields: dict[str, Any] = (
        {"task_id": str(task_id), "correlation_id": correlation_id or str(task_id)}
        if task_id
        else {}
    )
    logs.emit(
        log,
        "task.write_deferred",
        f"A write of {task_id or 'the daemon'} failed: {error}; its task waits in "
        "spool/active/ and is tried again every 5 s.",
        level=30,
        **fields,
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


def new_run(
    task_id: str,
    task: tasks.TaskFile,
    file_name: str,
    *,
    store: results.ResultStore,
    revision: str | None,
    clock: clocks.Clock,
    recovered: results.Result | None = None,
) -> TaskRun:
    """The record of a task the daemon takes: a fresh result, or for a task recovered after a
    crash its previous result (attempts kept) and the deadline it was accepted with."""
    # an id just taken over: its earlier task's log is removed (or is to be, in this pass's
    # commit), and the new log goes on after that task's ids
    after = store.taken_over.pop(task_id, None) if recovered is None else None
    new = recovered is None and (after is not None or store.holds_nothing(task_id))
    events_path = store.events_path(task_id)
    if recovered is not None:
        result = recovered
        result.status = "queued"
        result.error = None
        _keep_partial(result, events_path)
    else:
        result = new_result(
            task_id,
            task,
            events_path=events_path,
            source=f"spool/active/{file_name}",
            revision=revision,
            accepted_at=clocks.rfc3339(clock.now()),
        )
    now = clock.monotonic()
    deadline = now + task.deadline_ms / 1000 if task.deadline_ms else None
    accepted = _epoch(result.timings.accepted_at)
    if deadline is not None and recovered is not None and accepted is not None:
        # a re-queued task keeps the deadline it was accepted with, not a fresh one
        deadline -= max(0.0, clock.now() - accepted)
    return TaskRun(
        task_id=ids.TaskId(task_id),
        task=task,
        file_name=file_name,
        result=result,
        log=events.EventLog(events_path, new=new, after=after or 0),
        accepted_mono=now,
        deadline_mono=deadline,
        model_id=ids.ModelId(task.model or ""),
        pool_id=ids.PoolId(task.pool) if task.pool else None,
    )


def _keep_partial(result: results.Result, events_path: Path) -> None:
    """What the attempt a restart cut short wrote, from its log (its running result was
    written at its start, before any token): its tokens and text, so a task that ends
    without running again (canceled, expired) says what it had made; a new attempt
    starts them afresh."""
    try:
        frames = list(events.read(events_path))
    except (OSError, ValueError):
        return
    starts = [n for n, f in enumerate(frames) if f.event == "started"]
    if not starts:
        return
    tokens = [f.data for f in frames[starts[-1] + 1 :] if f.event == "token"]
    if tokens:
        counted = (t["i"] + 1 for t in tokens if isinstance(t.get("i"), int))
        result.tokens_out = max(len(tokens), max(counted, default=0))
        result.text = "".join(str(t.get("t", "")) for t in tokens)


def _epoch(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
