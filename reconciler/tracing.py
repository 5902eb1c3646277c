"""Trace artifacts: every finished task's transcript is stored in the artifact registry.

`tasking.Books.finish` calls `Tracer.finished` once a task's terminal result is written (the
commit point). The tracer copies what the trace needs from the result there, then reads the
event log and stores the artifact in a worker thread, so the loop never waits on it and a task's
end is never delayed by its trace. The daemon awaits `flush` before it stops.

A trace is `{kind: trace, tags: [sse, task:<id>, session:<id>], content: {task_id, frames},
metadata: {pool, replica, engine, engine_version, model, model_digest, seed, tokens_out,
status, error, attempts}}`: `frames` are the lines of results/<id>.events.jsonl as written.
Tasks rejected before they were queued get none (they never ran). Best effort: a trace that
cannot be stored is logged, and a daemon killed in the instant after a task ends may lose it.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from reconciler import clocks, logs, tasking
from state import artifacts, events

log = logs.get("tasks")


class Tracer:
    def __init__(self, store: artifacts.ArtifactStore, clock: clocks.Clock) -> None:
        self.store = store
        self.clock = clock
        self.pending: set[asyncio.Task[None]] = set()

    def finished(self, run: tasking.TaskRun) -> None:
        """A task's terminal result is written: store its trace, off the loop."""
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
        write = (run.task_id, run.log.path, tags, metadata, run.task.correlation_id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving Books directly): write it now
            self.write(*write)
            return
        job = loop.create_task(asyncio.to_thread(self.write, *write), name=f"trace:{run.task_id}")
        self.pending.add(job)
        job.add_done_callback(self.pending.discard)

    def write(
        self,
        task_id: str,
        log_path: Path,
        tags: list[str],
        meta: dict[str, Any],
        correlation_id: str | None = None,
    ) -> None:
        cid = correlation_id or task_id  # lines about a task carry its request's id
        try:
            frames = [f.model_dump(mode="json") for f in events.read(log_path)]
            document = artifacts.Artifact(
                kind="trace",
                content={"task_id": task_id, "frames": frames},
                tags=tags,
                metadata=meta,
            )
            record, _ = self.store.put(document, created_at=clocks.rfc3339(self.clock.now()))
        except (OSError, ValueError) as exc:  # ArtifactProblem is a ValueError
            logs.emit(
                log,
                "task.trace_failed",
                f"Could not store the trace of task {task_id}: {exc}",
                level=30,
                task_id=task_id,
                correlation_id=cid,
            )
            return
        logs.emit(
            log,
            "task.traced",
            f"Stored the trace of task {task_id} as artifact {record.id}.",
            artifact_id=record.id,
            task_id=task_id,
            correlation_id=cid,
        )

    async def flush(self) -> None:
        """Wait for the traces still being written (the daemon, before it stops)."""
        with contextlib.suppress(Exception):
            await asyncio.gather(*list(self.pending), return_exceptions=True)
