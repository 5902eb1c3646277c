"""The machine out of file descriptors (or memory): no file is blamed for it, nothing is
refused or lost, and the daemon neither spins nor floods its log while it lasts."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from reconciler import daemon as daemons
from reconciler import logs
from state import loading
from tests.conftest import Workspace, task, wait_for, wait_terminal


def _no_descriptors(
    monkeypatch: pytest.MonkeyPatch, under: Path, suffix: str = ""
) -> dict[str, bool]:
    """Every open of a path under `under` (ending in `suffix`) fails with EMFILE while
    `state["on"]`."""
    state = {"on": True}
    real_open = os.open

    def fake_open(path: Any, *args: Any, **kwargs: Any) -> int:
        shown = str(path)
        if state["on"] and shown.startswith(str(under)) and shown.endswith(suffix):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return state


def test_a_file_that_cannot_be_opened_for_want_of_descriptors_is_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.task.yaml"
    path.write_text("prompt: hi\n")
    _no_descriptors(monkeypatch, tmp_path)
    with pytest.raises(OSError) as raised:
        loading.read_bytes(path)
    assert raised.value.errno == errno.EMFILE


async def test_a_task_file_met_with_no_descriptors_left_is_taken_once_they_are_back(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await serve()
    # the claimed file's read fails: what the daemon would meet with none left
    state = _no_descriptors(monkeypatch, workspace.spool.active, ".task.yaml")
    workspace.submit("a.task.yaml", task("a"))
    await asyncio.sleep(1.0)
    assert not os.listdir(workspace.spool.failed)  # never quarantined for it
    assert workspace.result("a") is None
    state["on"] = False
    done = await wait_terminal(workspace, "a", 20)  # the recovery pass takes it again
    assert done["status"] == "succeeded"
    assert os.listdir(workspace.spool.done) == ["a.task.yaml"]


async def test_orch_yaml_is_not_called_invalid_when_descriptors_run_out(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await serve()
    config = running.daemon.config
    _no_descriptors(monkeypatch, workspace.config_path)
    with pytest.raises(OSError):
        config.refresh(settle=False)
    assert config.errors == [] and config.state is not None


async def test_failing_passes_back_off_and_are_said_once(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await serve()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger(logs.ROOT).addHandler(handler)
    calls = 0

    async def failing(self: daemons.Daemon, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        running.daemon.wake_event.set()  # the watcher keeps waking it, as files keep coming
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    try:
        monkeypatch.setattr(daemons.Daemon, "pass_once", failing)
        running.daemon.wake_event.set()
        await asyncio.sleep(1.6)
    finally:
        logging.getLogger(logs.ROOT).removeHandler(handler)
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s: about six passes, not thousands
    assert 3 <= calls <= 8, calls
    said = [r for r in records if getattr(r, "orch_event", "") == "pass.failed"]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "Too many open files" in said[0].getMessage()
    monkeypatch.undo()
    await wait_for(lambda: running.daemon._failed_passes == 0, 5, "a pass that works")


def test_the_event_loops_own_lines_are_json_and_a_repeat_is_said_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    logs.setup(fmt="json", stream=stream)
    try:
        loop_log = logging.getLogger("asyncio")
        for _ in range(50):
            try:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            except OSError:
                loop_log.error("socket.accept() out of system resource", exc_info=True)
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        line = json.loads(lines[0])
        assert line["level"] == "error" and "out of system resource" in line["human"]
        assert "Too many open files" in line["exception"]
    finally:
        logs.setup(fmt="json")
