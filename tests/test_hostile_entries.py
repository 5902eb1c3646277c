"""Hostile entries in spool/incoming/: every one gets an outcome a person can find (the entry in
spool/failed/ beside its .error.json, a rejected result where a task id is known), and none
stops or stalls the daemon."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Workspace, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def _records(ws: Workspace) -> dict[str, dict[str, Any]]:
    """Error records by the name of the entry they explain."""
    return {
        p.name.removesuffix(".error.json"): json.loads(p.read_text())
        for p in ws.spool.failed.glob("*.error.json")
    }


# -- entries that are not regular files, or cannot be claimed ---------------------------------


async def test_a_folder_in_incoming_at_start_is_quarantined_and_serving_goes_on(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.spool.tmp / "x.task.yaml").mkdir()
    (workspace.spool.tmp / "x.task.yaml").rename(workspace.spool.incoming / "x.task.yaml")
    running = await serve()
    workspace.submit("after.task.yaml", task("after"))
    assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
    assert not running.job.done(), "the daemon stopped"
    assert (workspace.spool.failed / "x.task.yaml").is_dir()
    record = _records(workspace)["x.task.yaml"]
    assert record["code"] == "INVALID_TASK_FILE" and "is a folder" in record["message"]
    assert record["hint"]
    assert (await wait_terminal(workspace, "x"))["status"] == "rejected"
    assert list(workspace.spool.incoming.iterdir()) == []


async def test_every_kind_of_entry_that_is_not_a_file_is_quarantined(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await serve()
    incoming = workspace.spool.incoming
    monkeypatch.chdir(incoming)  # a socket's path must be short
    listener = socket.socket(socket.AF_UNIX)
    listener.bind("sock.task.yaml")
    os.mkfifo(incoming / "fifo.task.yaml")
    (workspace.root / "folder").mkdir()
    (incoming / "to-folder.task.yaml").symlink_to(workspace.root / "folder")
    (incoming / "dangling.task.yaml").symlink_to(workspace.root / "nothing")
    (incoming / "full.task.yaml").mkdir()
    (incoming / "full.task.yaml" / "inner.task.yaml").write_text(yaml.safe_dump(task("inner")))
    try:
        workspace.submit("after.task.yaml", task("after"))
        assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
        names = ["sock", "fifo", "to-folder", "dangling", "full"]
        records = await wait_for(
            lambda: len(_records(workspace)) == len(names) and _records(workspace),
            5,
            "an error file for every entry",
        )
    finally:
        listener.close()
    assert sorted(records) == sorted(f"{n}.task.yaml" for n in names)
    assert all(r["code"] == "INVALID_TASK_FILE" and r["hint"] for r in records.values())
    assert "is a socket" in records["sock.task.yaml"]["message"]
    assert "symbolic link" in records["to-folder.task.yaml"]["message"]
    assert (workspace.spool.failed / "full.task.yaml" / "inner.task.yaml").exists()
    assert not running.job.done() and list(incoming.iterdir()) == []


async def test_an_entry_that_cannot_be_claimed_is_quarantined_where_it_is(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    active = workspace.spool.active
    link, rename = os.link, os.rename

    def failing(real: Any) -> Any:
        def call(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(dst).parent == active and Path(src).name == "stuck.task.yaml":
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "link", failing(link))
    monkeypatch.setattr(os, "rename", failing(rename))
    running = await serve()
    workspace.submit("stuck.task.yaml", task("stuck"))
    workspace.submit("after.task.yaml", task("after"))
    assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
    assert not running.job.done(), "the daemon stopped"
    stuck = await wait_terminal(workspace, "stuck")
    assert stuck["status"] == "rejected" and stuck["error"]["code"] == "INVALID_TASK_FILE"
    record = _records(workspace)["stuck.task.yaml"]
    assert record["path"] == "spool/incoming/stuck.task.yaml"
    assert "could not be claimed: Input/output error" in record["message"]
    assert (workspace.spool.failed / "stuck.task.yaml").exists()
