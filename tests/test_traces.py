"""The trace writer (state/traces.py): finished tasks' traces stored by a process of the
daemon's own, the same artifacts as stored in the daemon, and never lost for the writer's
sake: a writer that dies, cannot start or never says it is ready leaves the batch to the
caller's thread. It never outlives the daemon, and the signals meant for the daemon leave
it storing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugins import liveness
from reconciler import clocks, tracing
from state import artifacts, helpers, traces
from tests.conftest import Workspace, assert_helper_dies_with_daemon


def _log(folder: Path, task_id: str, frames: int = 3) -> Path:
    """An event log of `frames` frames, as the daemon writes one."""
    path = folder / f"{task_id}.events.jsonl"
    lines = [
        {"id": n + 1, "event": "token", "data": {"t": f"w{n}", "i": n}, "ts": "t"}
        for n in range(frames - 1)
    ] + [{"id": frames, "event": "end", "data": {"tokens_out": frames - 1}, "ts": "t"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _trace(folder: Path, task_id: str) -> traces.Trace:
    return traces.Trace(task_id, _log(folder, task_id), ["sse", f"task:{task_id}"], {"seed": 1})


def _stored(folder: Path, outcomes: list[traces.Outcome], task_ids: list[str]) -> None:
    """Each outcome is a stored artifact holding that task's frames, as written."""
    store = artifacts.ArtifactStore(folder / "artifacts")
    assert [kind for kind, _ in outcomes] == ["stored"] * len(task_ids)
    for (_, artifact_id), task_id in zip(outcomes, task_ids, strict=True):
        record = store.get(artifact_id)
        assert record is not None and record.document.kind == "trace"
        content = record.document.content
        assert isinstance(content, dict) and content["task_id"] == task_id
        logged = (folder / f"{task_id}.events.jsonl").read_text().splitlines()
        assert content["frames"] == [json.loads(line) for line in logged]


@pytest.fixture
def writer() -> Iterator[traces.TraceWriter]:
    w = traces.TraceWriter()
    w.ensure()
    yield w
    w.close()


def test_a_batch_is_stored_by_the_writer_as_the_daemon_would_store_it(
    tmp_path: Path, writer: traces.TraceWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [_trace(tmp_path, "a"), _trace(tmp_path, "b")]
    with monkeypatch.context() as here:  # nothing of it is stored in this process
        here.setattr(traces, "store", lambda *a: pytest.fail("stored in the daemon"))
        outcomes = writer.store(tmp_path / "artifacts", batch, "2026-11-29T00:00:00Z")
    pid = writer.pid
    assert pid is not None and pid != os.getpid() and liveness.running(pid)
    _stored(tmp_path, outcomes, ["a", "b"])
    # the same ids and files as stored in the daemon's own thread
    again = traces.store(tmp_path / "artifacts", batch, "later")
    assert again == outcomes


def test_a_log_that_cannot_be_read_fails_only_its_own_trace(
    tmp_path: Path, writer: traces.TraceWriter
) -> None:
    blocked = tmp_path / "x.events.jsonl"
    blocked.mkdir()  # a folder in the log's place
    lost = traces.Trace("x", blocked, ["sse"], {})
    outcomes = writer.store(tmp_path / "artifacts", [_trace(tmp_path, "a"), lost], "t")
    _stored(tmp_path, outcomes[:1], ["a"])
    kind, why = outcomes[1]
    assert kind == "failed" and "x.events.jsonl" in why


def test_a_writer_that_dies_leaves_its_batch_to_the_caller_and_is_started_again(
    tmp_path: Path, writer: traces.TraceWriter
) -> None:
    first = writer.pid
    assert first is not None
    writer.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t")
    os.kill(first, signal.SIGKILL)
    outcomes = writer.store(tmp_path / "artifacts", [_trace(tmp_path, "b")], "t")
    _stored(tmp_path, outcomes, ["b"])  # stored in this thread
    assert writer.pid is None
    writer.ensure()
    second = writer.pid
    assert second is not None and second != first
    _stored(tmp_path, writer.store(tmp_path / "artifacts", [_trace(tmp_path, "c")], "t"), ["c"])
    assert writer.pid == second


def test_a_writer_that_stopped_answering_is_given_up_on_and_the_batch_stored_here(
    tmp_path: Path, writer: traces.TraceWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer stopped by a signal (or hung on a disk) must not hold its batch, and the
    daemon's stop that waits for it, for ever: after STORE_S the batch is stored in the
    caller's thread and the writer ended."""
    monkeypatch.setattr(traces, "STORE_S", 0.5)
    first = writer.pid
    assert first is not None
    writer.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t")  # it is ready
    os.kill(first, signal.SIGSTOP)
    try:
        began = time.monotonic()
        outcomes = writer.store(tmp_path / "artifacts", [_trace(tmp_path, "b")], "t")
        assert time.monotonic() - began < 5
        _stored(tmp_path, outcomes, ["b"])
        assert writer.pid is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first, signal.SIGCONT)


def test_where_no_writer_can_start_the_batch_is_stored_in_the_callers_thread(
    tmp_path: Path, helpers_cannot_start: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And none is tried again for a while (RETRY_S), then one is."""
    w = traces.TraceWriter()
    w.ensure()
    try:
        outcomes = w.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t")
        _stored(tmp_path, outcomes, ["a"])
        monkeypatch.undo()  # whatever kept it from starting has passed
        w.ensure()  # not tried again yet
        assert w.pid is None
        monkeypatch.setattr(helpers, "RETRY_S", 0.0)
        w.ensure()
        outcomes = w.store(tmp_path / "artifacts", [_trace(tmp_path, "b")], "t")
        _stored(tmp_path, outcomes, ["b"])
        assert w.pid is not None
    finally:
        w.close()


def test_a_writer_started_again_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed start, a new writer is tried; until it says it is ready the batches
    are stored in the caller's thread at once, never each held up waiting for it."""
    slow = tmp_path / "slow-python"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(slow))
    w = traces.TraceWriter()
    w._failed_at = time.monotonic() - helpers.RETRY_S - 1  # one failed a while ago
    w.ensure()
    try:
        began = time.monotonic()
        _stored(tmp_path, w.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t"), ["a"])
        assert time.monotonic() - began < 0.8 and w.pid is not None  # not waited for
        time.sleep(1.5)
        with monkeypatch.context() as here:  # ready now: stored by the writer
            here.setattr(traces, "store", lambda *a: pytest.fail("stored in the daemon"))
            outcomes = w.store(tmp_path / "artifacts", [_trace(tmp_path, "b")], "t")
        _stored(tmp_path, outcomes, ["b"])
    finally:
        w.close()


def test_a_closed_writer_stores_in_the_callers_thread(tmp_path: Path) -> None:
    w = traces.TraceWriter()
    w.ensure()
    pid = w.pid
    assert pid is not None
    w.close()
    assert not liveness.running(pid)
    w.ensure()
    _stored(tmp_path, w.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t"), ["a"])
    assert w.pid is None


def test_signals_meant_for_the_daemon_leave_the_writer_storing(
    tmp_path: Path, writer: traces.TraceWriter
) -> None:
    writer.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t")  # ready
    pid = writer.pid
    assert pid is not None and os.getpgid(pid) != os.getpgid(0)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(pid, sig)
    time.sleep(0.1)
    _stored(tmp_path, writer.store(tmp_path / "artifacts", [_trace(tmp_path, "b")], "t"), ["b"])
    assert writer.pid == pid and liveness.running(pid)


def test_the_writer_never_outlives_the_daemon(tmp_path: Path) -> None:
    """Killed with it once it is serving, even while its pipe stays open (here another
    process holds the daemon's end, as a batch in flight would)."""
    assert_helper_dies_with_daemon(
        """
        from state import traces
        w = traces.TraceWriter()
        w.ensure()
        h = w._helper
        """
    )


def test_a_writer_that_dies_mid_batch_leaves_no_temporary_file(tmp_path: Path) -> None:
    """Its batch is stored by the caller instead, whole, and the files it had begun are
    removed at once (the startup sweep would only find them at the next start)."""
    batch = [_trace(tmp_path, f"t{n}") for n in range(1500)]
    folder = tmp_path / "artifacts"
    w = traces.TraceWriter()
    w.ensure()
    w.store(folder, batch[:1], "t")  # ready
    pid = w.pid
    assert pid is not None

    def kill_once_it_writes() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(p.name.endswith(".tmp") for p in folder.iterdir()):
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.0005)

    killer = threading.Thread(target=kill_once_it_writes)
    killer.start()
    try:
        outcomes = w.store(folder, batch, "t")
    finally:
        killer.join()
        w.close()
    assert not liveness.running(pid) and w.pid is None  # it was killed mid-batch
    _stored(tmp_path, outcomes, [f"t{n}" for n in range(1500)])
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_a_writer_past_descriptor_1023_still_stores(tmp_path: Path) -> None:
    """A daemon with many connections open starts its writer with pipes numbered 1024 or
    more (select() cannot wait on those)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}: cannot open 1,100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = []
    try:
        while len(held) < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        w = traces.TraceWriter()
        w.ensure()
        assert w._helper is not None and w._helper.from_helper >= 1024
        try:
            outcomes = w.store(tmp_path / "artifacts", [_trace(tmp_path, "a")], "t")
            _stored(tmp_path, outcomes, ["a"])
            assert w.pid is not None  # stored by the writer, not instead of it
        finally:
            w.close()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_traces_that_end_while_a_batch_is_stored_go_as_the_next_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker thread at a time: a slow writer never piles up threads waiting on it
    (they are the loop's executor, which the HTTP face uses too); what ends meanwhile is
    stored together next, and `flush` waits for all of it."""
    active, peak, sizes = 0, 0, []
    gate = threading.Event()

    def slow(folder: Path, items: list[traces.Trace], created_at: str) -> list[traces.Outcome]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        sizes.append(len(items))
        gate.wait(10)
        active -= 1
        return [("stored", f"sha256:{'0' * 64}")] * len(items)

    monkeypatch.setattr(traces, "store", slow)
    tracer = tracing.Tracer(artifacts.ArtifactStore(tmp_path / "artifacts"), clocks.RealClock())

    def end(task_id: str) -> None:
        tracer.waiting.append(tracing._Trace(_trace(tmp_path, task_id), None))
        tracer._start()

    end("a")
    await asyncio.sleep(0.05)
    for task_id in ("b", "c", "d"):
        end(task_id)
    await asyncio.sleep(0.05)
    assert sizes == [1] and len(tracer.pending) == 1
    gate.set()
    await tracer.flush()
    assert sizes == [1, 3] and peak == 1 and not tracer.waiting and not tracer.pending


async def test_the_daemon_sweeps_what_a_killed_writer_left_at_startup(
    workspace: Workspace, serve: Any
) -> None:
    """A trace writer killed with its daemon (SIGKILL) mid-batch leaves its temporary
    files in artifacts/; the next daemon removes them, and nothing else there: not a
    file being written by a live process (another config's daemon may share the folder)."""
    folder = workspace.root / "artifacts"
    folder.mkdir()
    left = folder / f".{'a' * 64}.json.999999-0badf00d.tmp"
    left.write_bytes(b'{"id": ')
    kept = folder / f"{'b' * 64}.json"
    kept.write_bytes(b"{}")
    with subprocess.Popen(["sleep", "30"]) as other:
        in_flight = folder / f".{'c' * 64}.json.{other.pid}-0badf00d.tmp"
        in_flight.write_bytes(b'{"id": ')
        try:
            await serve()
        finally:
            other.kill()
    assert not left.exists() and kept.read_bytes() == b"{}" and in_flight.exists()
