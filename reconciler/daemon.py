"""The daemon: wires the loop together and runs it until asked to stop (`orchctl serve`).

Level-triggered: watchdog events (orch.yaml, spool/incoming, spool/cancel), engine exits,
finished tasks and a periodic resync only *wake* the loop; each pass re-reads what it needs
and acts from scratch. A lost inotify event therefore delays work by at most one resync.

    pass = refresh config → reconcile pools → cancels → claim + admit → dispatch → status
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from plugins import interfaces, registry
from reconciler import (
    clocks,
    configuring,
    dispatch,
    failpoints,
    fanout,
    intake,
    logs,
    pools,
    status,
    tasking,
)
from state import desired, events, loading, results, sessions, spool
from state.errors import ErrorCode, ErrorEnvelope

log = logs.get("daemon")

RESYNC_S = 2.0
INTAKE_PER_PASS = 64
CANCEL_KEEP_S = 600.0
SESSION_SWEEP_S = 5.0  # how long a cancel for an id not seen yet waits for its task


@dataclass(frozen=True)
class Options:
    config_path: Path
    simulate: Path | None = None
    duration_s: float | None = None
    resync_s: float = RESYNC_S
    watch: bool = True  # watchdog on; off proves the resync alone delivers every task
    exit_when_idle: bool = False  # stop once the spool is empty and nothing runs (demos, tests)


class _Waker(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self.loop = loop
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.event.set)


class Daemon:
    def __init__(
        self,
        options: Options,
        *,
        clock: clocks.Clock | None = None,
        plugins: registry.Registry | None = None,
    ) -> None:
        self.options = options
        self.clock = clock or clocks.RealClock()
        self.plugins = plugins or registry.load()
        self.config = configuring.AppliedConfig(
            options.config_path.resolve(), set(self.plugins.engines), self.clock
        )
        self.wake_event = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.started_at = clocks.rfc3339(self.clock.now())
        self._next_sweep = 0.0

    def wake(self) -> None:
        self.wake_event.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()

    def _setup(self) -> None:
        if not self.config.refresh() or self.config.state is None:
            problems = "\n".join(f"  {e}" for e in self.config.errors)
            raise interfaces.ConfigProblem(
                f"{self.config.path} is not a valid config:\n{problems}\n"
                f"run `orchctl validate {self.config.path}` and fix the lines shown"
            )
        state = self.config.state
        base = self.config.base
        self.spool = spool.Spool(desired.resolve(base, state.paths.spool)).ensure()
        self.results = results.ResultStore(desired.resolve(base, state.paths.results))
        self.state_dir = desired.resolve(base, state.paths.state)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.sessions = sessions.SessionStore(self.state_dir / "sessions")
        self.hub = fanout.Hub()
        self.books = tasking.Books(self.spool, self.results, self.hub, self.clock)
        observer = self.plugins.observer(state, base, simulate=self.options.simulate)
        self.pools = pools.PoolRuntime(
            plugins=self.plugins,
            observer=observer,
            state_dir=self.state_dir,
            config=self.config,
            clock=self.clock,
            wake=self.wake,
        )
        self.dispatcher = dispatch.Dispatcher(
            books=self.books,
            config=self.config,
            pools=self.pools,
            sessions=self.sessions,
            clock=self.clock,
            wake=self.wake,
        )

    async def run(self) -> int:
        self._setup()
        loop = asyncio.get_running_loop()
        watcher = self._start_watchdog(loop) if self.options.watch else None
        deadline = (
            self.clock.monotonic() + self.options.duration_s
            if self.options.duration_s is not None
            else None
        )
        logs.emit(
            log,
            "daemon.started",
            f"Serving {self.config.path.name} (pid {os.getpid()}); spool at {self.spool.root}.",
            pid=os.getpid(),
            simulated=self.pools.observer.simulated,
        )
        try:
            await self.pools.adopt_or_clean()
            self._recover()
            while not self.stop_event.is_set():
                await self.pass_once()
                if self.options.exit_when_idle and self._idle():
                    logs.emit(log, "daemon.idle", "Spool empty and nothing running: stopping.")
                    break
                timeout = self.options.resync_s
                if self.config.state is not None:  # the NVML poll: GPUs change on their own
                    timeout = min(timeout, self.config.state.gpus.poll_s)
                if deadline is not None:
                    timeout = min(timeout, deadline - self.clock.monotonic())
                    if timeout <= 0:
                        break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake_event.wait(), timeout)
                self.wake_event.clear()
        finally:
            if watcher is not None:
                watcher.stop()
                await asyncio.to_thread(watcher.join, 5)
            await self.dispatcher.shutdown()
            await self.pools.shutdown()
            self._write_status(stopping=True)
            logs.emit(log, "daemon.stopped", "Stopped; engines stopped, tasks left resumable.")
        return 0

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> Any:
        observer = Observer()
        waker = _Waker(loop, self.wake_event)
        observer.schedule(waker, str(self.config.path.parent), recursive=False)
        observer.schedule(waker, str(self.spool.incoming), recursive=False)
        observer.schedule(waker, str(self.spool.cancel), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    async def pass_once(self) -> None:
        """One level-triggered pass over everything."""
        if self.config.refresh():
            self.dispatcher.sync_queue_config()
        await self.pools.reconcile()
        self._intake()
        # after intake, before dispatch: a task cancelled while still in incoming/ is queued
        # here and removed before it can start
        self._cancels()
        if self.clock.monotonic() >= self._next_sweep:  # reads every session file: not per pass
            self._next_sweep = self.clock.monotonic() + SESSION_SWEEP_S
            self.dispatcher.sweep_sessions()
        self.dispatcher.pump()
        self._write_status()

    def _idle(self) -> bool:
        return (
            not spool.incoming_names(self.spool)
            and not self.dispatcher.runs
            and self.pools.settled()
        )

    def _cancels(self) -> None:
        now = self.clock.now()
        for task_id in spool.cancel_requests(self.spool):
            outcome = self.cancel(task_id)
            # An unknown id may be a task still waiting in incoming/ (past this pass's intake
            # batch, or not yet delivered): keep its request until it shows up, for a while.
            if outcome == "unknown" and not self._cancel_expired(task_id, now):
                continue
            spool.consume_cancel(self.spool, task_id)

    def _cancel_expired(self, task_id: str, now: float) -> bool:
        try:
            return now - (self.spool.cancel / task_id).stat().st_mtime > CANCEL_KEEP_S
        except OSError:
            return True

    def cancel(self, task_id: str) -> str:
        """Cancel a task by id; idempotent. Returns what happened, for the CLI and HTTP."""
        if self.dispatcher.cancel(task_id):
            logs.emit(
                log, "task.cancel", f"Cancel of task {task_id} acknowledged.", task_id=task_id
            )
            return "canceled"
        existing = self.results.read(task_id) if self.results.exists(task_id) else None
        if existing is not None and existing.terminal:
            return f"already {existing.status}"
        return "unknown"

    def _intake(self) -> None:
        names = spool.incoming_names(self.spool)
        if len(names) > INTAKE_PER_PASS:
            # a burst of files: take a batch, dispatch it, come straight back for the rest,
            # so work starts (and status and cancels move) while the burst is admitted
            names = names[:INTAKE_PER_PASS]
            self.wake()
        for name in names:
            path = spool.claim(self.spool, name)
            if path is None:
                continue
            failpoints.hit("after_claim")
            self._take(path)

    def _take(self, path: Path, *, recovered: results.Result | None = None) -> None:
        try:
            parsed = intake.parse_claimed(path)
            if not isinstance(parsed, intake.Parsed):
                data = _peek(path)
                intake.quarantine(
                    the_spool=self.spool,
                    store=self.results,
                    path=path,
                    problems=parsed,
                    clock=self.clock,
                    task_id=intake.claimed_task_id(path, data),
                    revision=self.config.revision,
                )
                return
            if parsed.task_id in self.dispatcher.runs or (
                recovered is None and self.results.exists(parsed.task_id)
            ):
                self._refuse(
                    path,
                    ErrorCode.DUPLICATE_TASK_ID,
                    field="task_id",
                    message=f"task id {parsed.task_id!r} is already used "
                    f"(see results/{parsed.task_id}.json)",
                    hint="give the task a new task_id",
                    task_id=parsed.task_id,
                )
                return
            run = self._new_run(parsed, recovered=recovered)
            self.dispatcher.admit(run, recovered=recovered is not None)
        except Exception as exc:  # never let one file take the daemon down
            log.exception("could not take %s", path.name)
            with contextlib.suppress(Exception):
                self._refuse(
                    path,
                    ErrorCode.INTERNAL,
                    message=f"internal error {type(exc).__name__}: {exc}",
                    hint="this is a bug; please report it with the log",
                )

    def _refuse(
        self,
        path: Path,
        code: ErrorCode,
        *,
        message: str,
        hint: str,
        field: str | None = None,
        task_id: str | None = None,
    ) -> None:
        """Quarantine a claimed file for a reason that is not a parse error."""
        problem = loading.LoadError(f"spool/active/{path.name}", None, None, field, message, hint)
        intake.quarantine(
            the_spool=self.spool,
            store=self.results,
            path=path,
            clock=self.clock,
            code=code,
            task_id=task_id,
            problems=[problem],
        )

    def _new_run(
        self, parsed: intake.Parsed, *, recovered: results.Result | None = None
    ) -> tasking.TaskRun:
        now = self.clock.monotonic()
        events_path = self.results.events_path(parsed.task_id)
        if recovered is not None:
            result = recovered
            result.status = "queued"
            result.error = None
        else:
            result = tasking.new_result(
                parsed.task_id,
                parsed.task,
                events_path=events_path,
                source=f"spool/active/{parsed.file_name}",
                revision=self.config.revision,
                accepted_at=clocks.rfc3339(self.clock.now()),
            )
        deadline = now + parsed.task.deadline_ms / 1000 if parsed.task.deadline_ms else None
        accepted = _epoch(result.timings.accepted_at)
        if deadline is not None and recovered is not None and accepted is not None:
            # a re-queued task keeps the deadline it was accepted with, not a fresh one
            deadline -= max(0.0, self.clock.now() - accepted)
        return tasking.TaskRun(
            task_id=parsed.task_id,
            task=parsed.task,
            file_name=parsed.file_name,
            result=result,
            log=events.EventLog(events_path),
            accepted_mono=now,
            deadline_mono=deadline,
            model_id=parsed.task.model or "",
            pool_id=parsed.task.pool,
        )

    def _recover(self) -> None:
        """Tasks left in active/ by a crash: finish those whose result (or event log) is
        terminal, refuse second files of one task id, re-queue the rest in their original
        order (at-least-once execution, exactly-once completion)."""
        pending: list[tuple[str, Path, str | None, results.Result | None]] = []
        for name in spool.active_names(self.spool):
            path = self.spool.active / name
            parsed = intake.parse_claimed(path)
            task_id = parsed.task_id if isinstance(parsed, intake.Parsed) else None
            existing = self.results.read(task_id) if task_id else None
            if (existing is None or not existing.terminal) and isinstance(parsed, intake.Parsed):
                existing = self._finished_in_log(parsed, existing) or existing
            if existing is not None and existing.terminal:
                spool.finish(self.spool, name, failed=existing.status in ("failed", "rejected"))
                logs.emit(
                    log,
                    "task.recovered",
                    f"Task {task_id} was already {existing.status}; filed its task file.",
                    task_id=task_id,
                )
                continue
            key = existing.timings.accepted_at if existing and existing.timings.accepted_at else "~"
            pending.append((key, path, task_id, existing))
        seen: set[str] = set()
        for _, path, task_id, existing in sorted(pending, key=lambda p: (p[0], p[1].name)):
            if task_id is not None and task_id in seen:
                self._refuse(
                    path,
                    ErrorCode.DUPLICATE_TASK_ID,
                    field="task_id",
                    message=f"task id {task_id!r} is already used by another file",
                    hint="give the task a new task_id",
                    task_id=task_id,
                )
                continue
            if task_id is not None:
                seen.add(task_id)
            if existing is not None:
                logs.emit(
                    log,
                    "task.recovered",
                    f"Re-queued task {existing.task_id} interrupted while {existing.status}.",
                    task_id=existing.task_id,
                )
            self._take(path, recovered=existing)

    def _finished_in_log(
        self, parsed: intake.Parsed, existing: results.Result | None
    ) -> results.Result | None:
        """A crash after the terminal frame but before the result: rebuild the result from
        the log (the frame is the earlier commit), so the task is filed, not re-run."""
        frames = list(events.read(self.results.events_path(parsed.task_id)))
        if not frames or not frames[-1].terminal:
            return None
        result = existing or tasking.new_result(
            parsed.task_id,
            parsed.task,
            events_path=self.results.events_path(parsed.task_id),
            source=f"spool/active/{parsed.file_name}",
            revision=self.config.revision,
            accepted_at=frames[0].ts,
        )
        starts = [i for i, f in enumerate(frames) if f.event == "started"]
        tokens = [f for f in frames[starts[-1] if starts else 0 :] if f.event == "token"]
        result.text = "".join(str(f.data.get("t", "")) for f in tokens)
        last = frames[-1]
        if last.event == "end":
            reason = last.data.get("finish_reason")
            result.status = "canceled" if reason == "canceled" else "succeeded"
            result.finish_reason = reason
            result.tokens_out = int(last.data.get("tokens_out") or len(tokens))
        else:
            result.status = "failed" if starts else "rejected"
            result.error = ErrorEnvelope.model_validate(last.data)
        result.timings.finished_at = last.ts
        self.results.write(result)
        return result

    def _write_status(self, *, stopping: bool = False) -> None:
        try:
            status.write(self.state_dir / "status.json", status.build(self, stopping=stopping))
        except OSError as exc:
            logs.emit(log, "status.unwritable", f"Could not write status.json: {exc}", level=40)


def _peek(path: Path) -> object:
    text, _ = loading.read_text(path)
    if text is None:
        return None
    data, _, errs = loading.parse_document(text, path.name)
    return None if errs else data


def _epoch(rfc3339: str | None) -> float | None:
    if not rfc3339:
        return None
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
