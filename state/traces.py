"""Storing finished tasks' traces, in a process of the daemon's own: the trace writer.

A trace (`reconciler.tracing`) is a task's event log read back, built into a document,
written as canonical JSON and hashed for its id (`ArtifactStore.put_json_many`). That is
Python work: done by a thread of the daemon, it held the interpreter lock the event loop
needs for about a third of the loop's own time per task (the intake benchmark ran a
third faster with traces off). The trace writer does it in its own interpreter
(state/helpers.py: started from the daemon's main thread, dies with it; it holds none of
the daemon's locks); the daemon's thread hands it a batch and waits for the outcomes.

Messages: the writer says ("ready",) once started; the daemon sends ("store", folder,
created_at, traces) and the writer answers ("stored", outcomes), one per trace:
("stored", artifact id) or ("failed", why). A writer that dies, says something else or
cannot start is ended, and the batch is stored by the caller's thread instead (an
artifact is created once, so a batch stored twice keeps its first records), which first
removes the temporary files the dead writer left: slower, never lost for that. The next
batch starts a new writer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from state import artifacts, atomic, events, helpers

_log = logging.getLogger("llama_orch.traces")

# how long the trace writer may take to take a batch and to answer for it; a batch of a
# thousand traces takes it well under a second
STORE_S = 30.0

Outcome = tuple[str, str]  # ("stored", artifact id) or ("failed", why)


@dataclass(frozen=True)
class Trace:
    """What a finished task's trace needs besides its frames (read from `log_path`)."""

    task_id: str
    log_path: Path
    tags: list[str]
    metadata: dict[str, Any]


def store(folder: Path, traces: Sequence[Trace], created_at: str) -> list[Outcome]:
    """Read each trace's frames from its event log and store the traces in `folder`, made
    durable together; an outcome per trace, in order."""
    outcomes: list[Outcome | None] = [None] * len(traces)
    kept: list[int] = []
    documents: list[dict[str, Any]] = []
    for n, trace in enumerate(traces):
        try:
            frames = events.read_dicts(trace.log_path)
        except (OSError, ValueError) as exc:
            outcomes[n] = ("failed", str(exc))
            continue
        documents.append(
            {
                "kind": "trace",
                "content": {"task_id": trace.task_id, "frames": frames},
                "tags": trace.tags,
                "metadata": trace.metadata,
            }
        )
        kept.append(n)
    try:
        stored = artifacts.ArtifactStore(folder).put_json_many(documents, created_at=created_at)
    except OSError as exc:
        for n in kept:
            outcomes[n] = ("failed", str(exc))
    else:
        for n, outcome in zip(kept, stored, strict=True):
            if isinstance(outcome, artifacts.ArtifactProblem):
                outcomes[n] = ("failed", str(outcome))
            else:
                outcomes[n] = ("stored", outcome[0])
    return [outcome or ("failed", "not stored") for outcome in outcomes]


class TraceWriter(helpers.Owner):
    """The daemon's side: `ensure()` from the main thread (the writer dies with the thread
    that starts it), then `store` from any thread, one batch at a time; `close()`."""

    module, what = "state.traces", "trace writer"

    def ensure(self) -> None:
        """A writer started where there is none (never waited for), unless one could never
        be started. Call it from the thread the writer is to die with: the loop's, which
        never waits here for a batch in flight (a batch's thread starts none)."""
        self._start_one(wait=False)

    def store(self, folder: Path, traces: Sequence[Trace], created_at: str) -> list[Outcome]:
        """`store`, by the writer where one runs, else in this thread."""
        with self._lock:
            helper = self._helper
            reply, asked = None, False
            try:
                if helper is not None and self._ready(helper):
                    asked = True
                    message = ("store", folder, created_at, list(traces))
                    # a writer stopped or hung (a signal, a disk that stalls) is given up
                    # on, and the batch stored here: never a daemon that cannot stop
                    helpers.send(helper.to_helper, message, timeout_s=STORE_S)
                    helpers.wait_readable(helper.from_helper, STORE_S)
                    reply = helpers.receive(helper.from_helper)
            except Exception as exc:  # whatever it was, the batch is stored here
                asked = True
                _log.warning("the trace writer failed (%s): this batch is stored in-process", exc)
            if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == "stored":
                outcomes: list[Outcome] = reply[1]
                return outcomes
            if asked and helper is not None and self._helper is helper:
                # died or out of step: ended, and what it had begun of the batch removed
                self._discard(helper)
                atomic.sweep_leftovers(folder, pid=helper.process.pid)
        return store(folder, traces, created_at)


def _serve(argv: Sequence[str]) -> None:
    from_daemon, to_daemon = helpers.serving(argv)
    while True:
        message = helpers.receive(from_daemon)
        if message is None:
            return
        _, folder, created_at, traces = message
        helpers.send(to_daemon, ("stored", store(folder, traces, created_at)))


if __name__ == "__main__":
    helpers.main(_serve)
