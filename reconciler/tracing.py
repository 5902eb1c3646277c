"""Trace artifacts: every finished task's transcript is stored in the artifact registry.

`tasking.Books.finish` calls `Tracer.finished` once a task's terminal result is written (the
commit point). The tracer copies what the trace needs from the result there; the traces of tasks
that end within TRACE_BATCH_S of each other are then read from their event logs and stored
together (two syncs for the batch, not two fsyncs per trace; one batch at a time, the traces
that end meanwhile going in the next) by the trace writer, a process of the daemon's own
(state/traces.py), which a worker thread hands the batch and waits on: the loop never waits
on a trace, nor shares its interpreter with the work of one, and a task's end is never
delayed by its trace. Where no writer runs, the worker thread stores the batch
itself. The daemon awaits `flush` before it stops.

A trace is `{kind: trace, tags: [sse, task:<id>, session:<id>], content: {task_id, frames},
metadata: {pool, replica, engine, engine_version, model, model_digest, seed, tokens_out,
status, error, attempts}}`: `frames` are the lines of results/<id>.events.jsonl as written.
Tasks rejected before they were queued get none (they never ran). Best effort: a trace that
cannot be stored is logged, and a daemon killed in the instant after a task ends may lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from reconciler import clocks, logs, tasking
from state import artifacts, traces

log = logs.get("tasks")


TRACE_BATCH_S = 0.05  # traces of tasks that end within this long are stored together


@dataclass(frozen=True)
class _Trace:
    trace: traces.Trace
    correlation_id: str | None


class Tracer:
    def __init__(self, store: artifacts.ArtifactStore, clock: clocks.Clock) -> None:
        self.store = store
        self.clock = clock
        # the process that stores the batches (the daemon sets it while it serves); None:
        # the worker thread stores them
        self.writer: traces.TraceWriter | None = None
        self.waiting: list[_Trace] = []  # finished, to go in the next batch
        self.pending: set[asyncio.Task[None]] = set()  # batches being written
        self._timer: asyncio.Handle | None = None

    def finished(self, run: tasking.TaskRun) -> None:
        """A task's terminal result is written: store its trace with the next batch, off
        the loop."""
        result = run.result
        if result.status == "rejected":
            return
        tags = ["sse", f"task:{run.task_id}"]
        if result.session_id:
            tags.append(f"session:{result.session_id}")
        metadata: dict[str, Any] = {
            "pool": result.pool_id,
            "replica": result.replica_id,
            "engine": result.engine,
            "engine_version": result.engine_version,
            "model": result.model,
            "model_digest": result.model_digest,
            "seed": result.seed,
            "tokens_out": result.tokens_out,
            "status": result.status,
            "error": result.error.model_dump(mode="json") if result.error else None,
            "attempts": result.attempts,
        }
        trace = _Trace(
            traces.Trace(run.task_id, run.log.path, tags, metadata), run.task.correlation_id
        )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving Books directly): write it now
            self.write([trace])
            return
        self.waiting.append(trace)
        if self._timer is None:
            self._timer = loop.call_later(TRACE_BATCH_S, self._start)

    def _start(self) -> None:
        """Hand the waiting traces to a worker thread as one batch; while one is being
        stored, the traces that end meanwhile wait for it and go as the next batch (one
        worker thread at a time, never a pile of them waiting on the writer)."""
        self._timer = None
        if self.pending or not self.waiting:
            return
        batch, self.waiting = self.waiting, []
        if self.writer is not None:
            self.writer.ensure()  # started from the loop's thread: it dies with the daemon
        job = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self.write, batch),
            name=f"traces:{batch[0].trace.task_id}+{len(batch)}",
        )
        self.pending.add(job)
        job.add_done_callback(self._stored)

    def _stored(self, job: asyncio.Task[None]) -> None:
        self.pending.discard(job)
        if self.waiting and self._timer is None:
            self._timer = asyncio.get_running_loop().call_soon(self._start)

    def write(self, batch: list[_Trace]) -> None:
        """Store a batch of traces, made durable together (`traces.store`, by the trace
        writer where one runs: their frames are JSON this daemon wrote, copied without
        validating them again), and log each one's outcome."""
        items = [entry.trace for entry in batch]
        created_at = clocks.rfc3339(self.clock.now())
        try:
            if self.writer is not None:
                outcomes = self.writer.store(self.store.root, items, created_at)
            else:
                outcomes = traces.store(self.store.root, items, created_at)
        except Exception as exc:  # a bug or a folder gone wrong: said per trace, not lost
            outcomes = [("failed", f"{type(exc).__name__}: {exc}")] * len(items)
        for entry, (outcome, said) in zip(batch, outcomes, strict=True):
            if outcome != "stored":
                self._failed(entry, said)
                continue
            logs.emit(
                log,
                "task.traced",
                f"Stored the trace of task {entry.trace.task_id} as artifact {said}.",
                artifact_id=said,
                task_id=entry.trace.task_id,
                correlation_id=entry.correlation_id or entry.trace.task_id,
            )

    def _failed(self, entry: _Trace, why: str) -> None:
        task_id = entry.trace.task_id
        logs.emit(
            log,
            "task.trace_failed",
            f"Could not store the trace of task {task_id}: {why}",
            level=30,
            task_id=task_id,
            # lines about a task carry its request's id
            correlation_id=entry.correlation_id or task_id,
        )

    async def flush(self) -> None:
        """Write what waits and wait for every batch still being written (the daemon,
        before it stops)."""
        while self.waiting or self.pending:
            if self._timer is not None:
                self._timer.cancel()
            self._start()
            with contextlib.suppress(Exception):
                await asyncio.gather(*list(self.pending), return_exceptions=True)
