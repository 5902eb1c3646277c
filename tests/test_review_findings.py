"""Review findings: each test proved one bug (first committed as a strict xfail) and now guards
its fix."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import admitting
from state import events, results, spool
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow

TS = "2024-01-01T00:00:00.000Z"


def _slow(slots: int = 1, tokens_per_s: float = 40, **extra: Any) -> dict[str, Any]:
    cfg = config(**extra)
    cfg["pools"][0]["slots"] = slots
    cfg["pools"][0]["sim"] = {"tokens_per_s": tokens_per_s, "load_s": 0.0}
    return cfg


def _started(ws: Workspace, task_id: str) -> bool:
    return any(f.event == "started" for f in ws.frames(task_id))


def _put_active(ws: Workspace, name: str, data: dict[str, Any]) -> Path:
    path = ws.spool.active / name
    path.write_text(yaml.safe_dump(data))
    return path


def _settle(d: Any) -> None:
    """Retrieve the exceptions of tasks the bugs leave behind, then collect them, so their
    'never retrieved' finalizers do not run later in the middle of pytest's own work."""
    for r in list(d.dispatcher.running.values()):
        if r.job is not None and r.job.done() and not r.job.cancelled():
            r.job.exception()
    gc.collect()


def _error_records(ws: Workspace) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in ws.spool.failed.glob("*.error.json")]


# -- crash recovery ---------------------------------------------------------------------------


async def test_a_crash_between_terminal_frame_and_result_is_recovered(
    workspace: Workspace, serve: Any
) -> None:
    store = workspace.results
    log = events.EventLog(store.events_path("r1"))
    log.append("queued", {"queue_position": 0}, ts=TS)
    log.append("started", {"attempt": 1}, ts=TS)
    log.append("token", {"t": "x", "i": 0}, ts=TS)
    log.append("end", {"tokens_out": 1, "finish_reason": "length"}, ts=TS)
    store.write(
        results.Result(
            task_id="r1",
            status="running",
            attempts=1,
            events=str(store.events_path("r1")),
            timings=results.Timings(accepted_at=TS, started_at=TS),
        )
    )
    _put_active(workspace, "r1.task.yaml", task("r1"))
    running = await serve()
    try:
        result = await wait_terminal(workspace, "r1", 5)
        assert result["status"] in results.TERMINAL
        assert list(workspace.spool.active.iterdir()) == []
        # and the slot it took is free again
        await wait_for(lambda: running.daemon.dispatcher.running == {}, 3, "no running task")
    finally:
        _settle(running.daemon)


async def test_a_duplicate_claimed_before_a_crash_is_refused_after_restart(
    workspace: Workspace, serve: Any
) -> None:
    store = workspace.results
    events.EventLog(store.events_path("X")).append("queued", {"queue_position": 0}, ts=TS)
    store.write(
        results.Result(
            task_id="X",
            status="queued",
            events=str(store.events_path("X")),
            timings=results.Timings(accepted_at=TS),
        )
    )
    _put_active(workspace, "a.task.yaml", task("X", prompt="the original prompt"))
    _put_active(workspace, "b.task.yaml", task("X", prompt="a duplicate's prompt"))
    await serve()
    await wait_terminal(workspace, "X", 10)
    await asyncio.sleep(0.5)
    assert list(workspace.spool.active.iterdir()) == []
    codes = [r["code"] for r in _error_records(workspace)]
    assert codes == ["DUPLICATE_TASK_ID"]


async def test_a_reused_file_name_does_not_replace_a_live_task_file(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow(tokens_per_s=20))
    running = await serve()
    workspace.submit("same.task.yaml", task("t1", max_tokens=60))
    await wait_for(lambda: _started(workspace, "t1"))
    workspace.submit("same.task.yaml", task("t2", max_tokens=3))
    await asyncio.sleep(0.6)  # several passes: the newcomer waits in incoming/, never replaces
    assert (workspace.spool.incoming / "same.task.yaml").exists()
    assert "t1" in (workspace.spool.active / "same.task.yaml").read_text()
    await running.stop()  # graceful stop: both tasks are left resumable
    await serve()
    assert (await wait_terminal(workspace, "t1", 8))["status"] == "succeeded"
    assert (await wait_terminal(workspace, "t2", 8))["status"] == "succeeded"


# -- cancel -----------------------------------------------------------------------------------


async def test_a_cancel_for_a_task_past_the_intake_batch_is_not_lost(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(config(queue={"capacity": 256, "full_policy": "reject"}))
    for i in range(70):
        path = workspace.submit(f"job{i}.task.yaml", task(f"job{i}", max_tokens=2))
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    spool.request_cancel(workspace.spool, "job69")
    await serve(ready=False)
    result = await wait_terminal(workspace, "job69", 20)
    assert result["status"] == "canceled"


async def test_a_cancel_right_after_dispatch_finishes_the_task_and_frees_the_slot(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    d = running.daemon
    pump = d.dispatcher.pump

    def pump_then_cancel() -> None:  # a cancel (e.g. from the HTTP face) right after dispatch
        before = set(d.dispatcher.running)
        pump()
        for task_id in set(d.dispatcher.running) - before:
            d.cancel(task_id)

    d.dispatcher.pump = pump_then_cancel
    workspace.submit("quick.task.yaml", task("quick"))
    result = await wait_terminal(workspace, "quick", 5)
    assert result["status"] == "canceled"
    assert d.dispatcher.running == {}
    assert all(not r.leases for r in d.pools.replicas.values())


# -- bad input ----------------------------------------------------------------------------------


async def test_an_unsafe_session_id_is_an_invalid_task_file_with_a_result(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("dots.task.yaml", task("dots", session_id="a..b"))
    records = await wait_for(lambda: _error_records(workspace), 5, "an error record")
    assert records[0]["code"] == "INVALID_TASK_FILE" and records[0]["field"] == "session_id"
    assert (await wait_terminal(workspace, "dots", 3))["status"] == "rejected"


async def test_a_task_whose_admission_raised_does_not_block_its_id(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await serve()
    real = admitting.session_problem
    calls = []

    def boom_once(dispatcher: Any, run: Any) -> Any:
        calls.append(run.task_id)
        if len(calls) == 1:
            raise RuntimeError("an admission bug")
        return real(dispatcher, run)

    monkeypatch.setattr(admitting, "session_problem", boom_once)
    workspace.submit("dots.task.yaml", task("dots", session_id="s1"))
    records = await wait_for(lambda: _error_records(workspace), 5, "an error record")
    assert records[0]["code"] == "INTERNAL"
    workspace.submit("dots2.task.yaml", task("dots", session_id="s1"))
    assert (await wait_terminal(workspace, "dots", 5))["status"] == "succeeded"


async def test_a_file_name_with_a_newline_is_not_a_task_id(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    # deliver() refuses such a name now; a producer writing into incoming/ itself does not
    (workspace.spool.incoming / "nl\n.task.yaml").write_text(yaml.safe_dump(task("nl")))
    await wait_for(
        lambda: (
            list(workspace.spool.failed.iterdir())
            or [p for p in (workspace.root / "results").iterdir() if "\n" in p.name]
        ),
        5,
        "the file to be handled",
    )
    await asyncio.sleep(0.3)
    assert [p.name for p in (workspace.root / "results").iterdir() if "\n" in p.name] == []
    [record] = _error_records(workspace)
    assert "control character" in record["message"] and record["original_name"] == "nl\\n.task.yaml"


async def test_a_directory_in_the_cancel_folder_does_not_stop_the_daemon(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    (workspace.spool.cancel / "oops").mkdir()
    workspace.submit("after.task.yaml", task("after"))
    await asyncio.sleep(1.0)
    try:
        assert not running.job.done(), "the daemon stopped"
        assert (await wait_terminal(workspace, "after", 5))["status"] == "succeeded"
    finally:
        if running.job.done() and not running.job.cancelled():
            running.job.exception()
        gc.collect()


async def test_a_fifo_in_incoming_does_not_stall_the_daemon(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    stop = threading.Event()

    def unblock() -> None:  # keep the test from hanging forever: feed EOF every ~3 s
        while not stop.wait(3.0):
            for folder in (workspace.spool.active, workspace.spool.incoming):
                try:
                    fd = os.open(folder / "pipe.task.yaml", os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                os.close(fd)

    feeder = threading.Thread(target=unblock, daemon=True)
    feeder.start()
    try:
        os.mkfifo(workspace.spool.incoming / "pipe.task.yaml")
        began = time.monotonic()
        workspace.submit("good.task.yaml", task("good"))
        await wait_terminal(workspace, "good", 20)
        elapsed = time.monotonic() - began
    finally:
        stop.set()
    assert elapsed < 2.0, f"a good task took {elapsed:.1f} s behind a FIFO"


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 12):
        refs = ",".join([f"*l{i - 1}"] * 9)
        lines.append(f"l{i}: &l{i} [{refs}]")
    lines += ["model: m1", "max_tokens: 1", "prompt: *l11"]
    path = tmp_path / "bomb.task.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 2048
    code = (
        "import resource,sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from reconciler import intake\n"
        f"out = intake.parse_claimed(__import__('pathlib').Path({str(path)!r}))\n"
        "print('errors' if isinstance(out, list) else 'parsed')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        out, _ = child.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()  # reap it and close its pipe
        out = b"timed out after 10 s"
    assert out.strip() == b"errors", out.strip()[-200:]


# -- event stream contract ----------------------------------------------------------------------


def _ts(frame: events.EventFrame) -> float:
    return datetime.fromisoformat(frame.ts.replace("Z", "+00:00")).timestamp()


async def test_metrics_frames_come_at_least_once_a_second(workspace: Workspace, serve: Any) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 50, "load_s": 0.0, "first_token_ms": 3000}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("slowstart.task.yaml", task("slowstart", max_tokens=3))
    await wait_terminal(workspace, "slowstart", 15)
    frames = workspace.frames("slowstart")
    live = frames[[f.event for f in frames].index("started") :]
    gaps = [_ts(b) - _ts(a) for a, b in itertools.pairwise(live)]
    assert max(gaps) <= 1.5, f"the stream was silent for {max(gaps):.1f} s"
    metrics = [f.data for f in live if f.event == "metrics"]  # HME-021's fields, in each
    assert len(metrics) >= 2 and all(
        {"queue_depth", "on_time_probability"} <= set(m) for m in metrics
    )
