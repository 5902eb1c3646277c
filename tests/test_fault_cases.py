"""Faults of the world around the daemon, one by one: a full disk on every write path while
inotify is off, engines that hang, ignore SIGTERM or leave a helper process behind, and NVML
that fails or loses a GPU. Each ends with the invariants of tests/faults.py: every task
terminal, no partial or temporary file, no engine process left."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import pytest

from plugins import gpu_nvml, registry
from reconciler import daemon as daemons
from state import failpoints
from tests import fake_pynvml, faults
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

# every write path fails once or twice with ENOSPC, at different moments
DISK_FULL = ",".join(
    [
        "result_write=enospc@2",
        "before_result_rename=enospc@9",
        "frame_write=enospc@6",
        "session_write=enospc@1",
        "error_record_write=enospc@1",
        "status_write=enospc@1-3",
        "engine_record_write=enospc@1",
        "last_good_write=enospc@2",
    ]
)


@pytest.mark.slow
def test_a_full_disk_on_every_write_path_fails_tasks_clearly_and_the_daemon_stays_up(
    workspace: Workspace,
) -> None:
    """Also with inotify off (`--no-watch`): every event is lost, the resync delivers."""
    failpoints.parse(DISK_FULL)  # every point named exists
    workspace.write_config(faults.pool_config())
    log = workspace.root / "daemon.log"
    trace = workspace.root / "trace"
    daemon = faults.serve(workspace, log, "--no-watch", failpoints=DISK_FULL, trace=trace)
    try:
        ids = [f"d{i}" for i in range(8)]
        for i, task_id in enumerate(ids):
            extra = {"session_id": "s1"} if i % 3 == 0 else {}
            workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=6, **extra))
        workspace.submit("bad.task.yaml", task("bad", max_tokens=0))
        workspace.write_config(faults.pool_config(ctx=4096))  # a replica replaced: records
        end = time.monotonic() + 60
        while time.monotonic() < end and any(
            (workspace.result(t) or {}).get("status") not in faults.TERMINAL for t in [*ids, "bad"]
        ):
            assert daemon.poll() is None, log.with_suffix(".stderr").read_text()[-800:]
            time.sleep(0.1)
        assert daemon.poll() is None, "the daemon died of a full disk"
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    fired = {line.split()[2] for line in trace.read_text().splitlines() if " fire " in line}
    assert {"result_write", "frame_write", "session_write", "status_write"} <= fired
    outcomes = {t: workspace.result(t) for t in [*ids, "bad"]}
    assert outcomes["bad"]["status"] == "rejected"  # type: ignore[index]
    for task_id, result in outcomes.items():
        assert result is not None and result["status"] in faults.TERMINAL, task_id
        if result["status"] == "failed":
            assert "No space left on device" in result["error"]["message"], result["error"]
    faults.check_visible(workspace)
    faults.check_no_leftovers(workspace)
    faults.check_no_engines(workspace)


def _stubborn(**faults_on: Any) -> dict[str, Any]:
    cfg = config()
    cfg["timeouts"] = {"ready_s": 2, "drain_s": 1, "stop_grace_s": 0.5}
    cfg["models"]["m2"] = {"ref": "file:m2.gguf", "size_mib": 1000}
    cfg["pools"][0]["sim"] = {"tokens_per_s": 200, "faults": faults_on}
    cfg["pools"].append(
        {
            "id": "p2",
            "engine": "sim",
            "model": "m2",
            "ctx": 1024,
            "sim": {"faults": {"hang_before_ready": True, "leave_child": True}},
        }
    )
    return cfg


@pytest.mark.slow
def test_engines_that_ignore_sigterm_hang_or_leave_a_helper_leave_nothing_running(
    workspace: Workspace,
) -> None:
    """The stop escalates to SIGKILL and reaps the whole process group: a helper that ignored
    the SIGTERM used to outlive its engine (the stop returned once the leader was gone)."""
    workspace.write_config(_stubborn(ignore_sigterm=True, leave_child=True))
    log = workspace.root / "daemon.log"
    daemon = faults.serve(workspace, log)
    try:
        workspace.submit("ok.task.yaml", task("ok", max_tokens=4))
        end = time.monotonic() + 30
        while (workspace.result("ok") or {}).get("status") != "succeeded":
            assert time.monotonic() < end and daemon.poll() is None
            time.sleep(0.1)
        # p2 hangs before ready: replaced after ready_s, its helpers too, again and again
        time.sleep(3)
        workspace.write_config(_stubborn(leave_child=True))  # p1 replaced: its engine stopped
        time.sleep(2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    text = log.read_text()
    assert "fault leave_child" in "".join(
        p.read_text() for p in (workspace.root / ".orch" / "engines").glob("*.log*")
    )
    assert '"replica.stopped"' in text
    faults.check_no_engines(workspace)


async def test_nvml_errors_and_a_lost_gpu_never_stop_the_daemon(
    workspace: Workspace,
) -> None:
    """A real NVML observer over the fake module: readings fail, a GPU falls off the bus, the
    GPU count cannot be read; the loop goes on, says so in status.json and keeps serving."""
    nvml = fake_pynvml.FakeNvml()
    nvml.add_gpu()
    plugins = registry.load(entry_points=False)
    plugins.observers["nvml"] = lambda state, base: gpu_nvml.open_nvml(nvml)
    cfg = config()
    cfg["gpus"] = {"observer": "nvml", "reserve_mib": 512, "poll_s": 0.1}
    workspace.write_config(cfg)
    options = daemons.Options(config_path=workspace.config_path, resync_s=0.1)
    d = daemons.build(options, plugins=plugins)
    job = asyncio.get_running_loop().create_task(d.run())
    try:
        workspace.submit("a.task.yaml", task("a"))
        assert (await wait_terminal(workspace, "a", 20))["status"] == "succeeded"
        nvml.fail(0, "nvmlDeviceGetMemoryInfo")
        nvml.fail(1, "nvmlDeviceGetTemperature", fake_pynvml.NVMLError_NotSupported)
        nvml.lose(1)
        await wait_for(lambda: "lost" in str(workspace.status()["gpus"]), 10, "the lost GPU")
        nvml.count_error = fake_pynvml.NVMLError_Unknown
        workspace.submit("b.task.yaml", task("b"))
        assert (await wait_terminal(workspace, "b", 20))["status"] in faults.TERMINAL
        nvml.gpus.pop()  # the lost GPU is gone for good: the driver lists one
        nvml.count_error = None
        workspace.submit("c.task.yaml", task("c"))
        assert (await wait_terminal(workspace, "c", 20))["status"] in faults.TERMINAL
        assert not job.done()
        assert len(workspace.status()["gpus"]) >= 1
    finally:
        d.stop()
        assert await asyncio.wait_for(job, 30) == 0
    faults.check_no_engines(workspace)


def test_a_terminal_result_the_disk_refused_once_is_written_from_the_log_never_contradicting_it(
    workspace: Workspace,
) -> None:
    """The third result write of the task (its terminal one) fails with a full disk after
    its `end` frame is in the log: its result is never `failed` against that `end`; the
    recovery pass writes `succeeded` from the log and files the task in done/."""
    workspace.write_config(faults.pool_config())
    log = workspace.root / "daemon.log"
    daemon = faults.serve(workspace, log, failpoints="result_write=enospc@3")
    try:
        workspace.submit("once.task.yaml", task("once", max_tokens=6))
        end = time.monotonic() + 30
        while time.monotonic() < end and (workspace.result("once") or {}).get("status") not in (
            faults.TERMINAL
        ):
            assert (workspace.result("once") or {}).get("status") != "failed"
            assert daemon.poll() is None
            time.sleep(0.05)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    result = workspace.result("once")
    assert result is not None and result["status"] == "succeeded", result
    assert result["tokens_out"] == 6 and result["source_file"] == "spool/done/once.task.yaml"
    assert (workspace.spool.done / "once.task.yaml").exists()
    faults.check_visible(workspace)


async def test_a_hung_engine_is_killed_and_restarted_not_left_ready(
    workspace: Workspace, serve: Any
) -> None:
    """An engine that stops sending tokens (here SIGSTOPped, as a GPU fault would hang it)
    fails its task with DECODE_TIMEOUT; it then takes no task, is killed and restarted with
    the reason shown, and the next task runs on the new process."""
    cfg = config(timeouts={"ready_s": 10, "drain_s": 2, "stop_grace_s": 0.5, "decode_idle_s": 1})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    await serve()

    def replica() -> dict[str, Any]:
        row: dict[str, Any] = workspace.status()["pools"][0]["replicas"][0]
        return row

    hung_pid = replica()["pid"]
    workspace.submit("long.task.yaml", task("long", max_tokens=200))
    await wait_for(lambda: len(workspace.frames("long")) >= 4, 10, "tokens flowing")
    os.kill(hung_pid, signal.SIGSTOP)
    try:
        long = await wait_terminal(workspace, "long", 15)
        assert long["error"]["code"] == "DECODE_TIMEOUT", long
        await wait_for(
            lambda: replica()["pid"] not in (None, hung_pid) and replica()["state"] == "Ready",
            20,
            "a new engine process",
        )
        assert replica()["restarts"] == 1 and "hung" in (replica()["last_error"] or "")
        workspace.submit("after.task.yaml", task("after", max_tokens=3))
        assert (await wait_terminal(workspace, "after", 15))["status"] == "succeeded"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung_pid, signal.SIGCONT)
            os.kill(hung_pid, signal.SIGKILL)


async def test_an_engine_frozen_while_idle_is_found_hung_by_its_first_task(
    workspace: Workspace, serve: Any
) -> None:
    """An engine frozen between tasks stays Ready as far as its process goes; the first
    task placed on it gets no token and fails DECODE_TIMEOUT. Its health check then goes
    unanswered: it is hung, killed and restarted, and does not fail every later task too."""
    cfg = config(timeouts={"ready_s": 10, "drain_s": 2, "stop_grace_s": 0.5, "decode_idle_s": 1})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 50, "load_s": 0.0}
    workspace.write_config(cfg)
    await serve()

    def replica() -> dict[str, Any]:
        row: dict[str, Any] = workspace.status()["pools"][0]["replicas"][0]
        return row

    frozen = replica()["pid"]
    os.kill(frozen, signal.SIGSTOP)
    try:
        workspace.submit("first.task.yaml", task("first", max_tokens=3))
        first = await wait_terminal(workspace, "first", 15)
        assert first["error"]["code"] == "DECODE_TIMEOUT", first
        await wait_for(
            lambda: replica()["pid"] not in (None, frozen) and replica()["state"] == "Ready",
            20,
            "a new engine process",
        )
        assert "no answer to a health check" in (replica()["last_error"] or ""), replica()
        workspace.submit("after.task.yaml", task("after", max_tokens=3))
        assert (await wait_terminal(workspace, "after", 15))["status"] == "succeeded"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
            os.kill(frozen, signal.SIGKILL)


async def test_a_long_wait_for_the_first_token_fails_the_task_but_keeps_the_engine(
    workspace: Workspace, serve: Any
) -> None:
    """A prefill longer than decode_idle_s (the first token after 3 s, the limit 1 s) is no
    sign of a hung engine: the task fails DECODE_TIMEOUT, the replica keeps its process."""
    cfg = config(timeouts={"ready_s": 10, "drain_s": 2, "stop_grace_s": 0.5, "decode_idle_s": 1})
    cfg["pools"][0]["sim"] = {"tokens_per_s": 100, "load_s": 0.0, "first_token_ms": 3000}
    workspace.write_config(cfg)
    await serve()
    pid = workspace.status()["pools"][0]["replicas"][0]["pid"]
    workspace.submit("slow.task.yaml", task("slow", max_tokens=3))
    slow = await wait_terminal(workspace, "slow", 15)
    assert slow["error"]["code"] == "DECODE_TIMEOUT", slow
    await asyncio.sleep(1.5)
    replica = workspace.status()["pools"][0]["replicas"][0]
    assert (replica["pid"], replica["restarts"], replica["state"]) == (pid, 0, "Ready")
