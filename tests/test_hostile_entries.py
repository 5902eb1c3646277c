"""Hostile entries in spool/incoming/: every one gets an outcome a person can find (the entry in
spool/failed/ beside its .error.json, a rejected result where a task id is known), and none
stops or stalls the daemon."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import logs
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


# -- names that cannot be kept as they are ------------------------------------------------------


async def test_a_name_too_long_for_its_error_file_is_quarantined_under_a_shorter_one(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    name = "a" * 240 + ".task.yaml"
    (workspace.spool.incoming / name).write_text(yaml.safe_dump(task("long")))
    result = await wait_terminal(workspace, "long")
    assert result["status"] == "rejected" and result["error"]["code"] == "INVALID_TASK_FILE"
    [(kept, record)] = _records(workspace).items()
    assert record["original_name"] == name and "250 bytes long" in record["message"]
    assert (workspace.spool.failed / kept).exists() and kept.endswith(".task.yaml")
    assert result["source_file"] == f"spool/failed/{kept}"


async def test_a_name_that_is_not_utf8_gets_an_error_file_and_a_rejected_result(
    workspace: Workspace, serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await serve()
    raw = os.fsencode(workspace.spool.incoming) + b"/caf\xe9.task.yaml"
    with open(raw, "wb") as fh:
        fh.write(yaml.safe_dump(task("cafe")).encode())
    result = await wait_terminal(workspace, "cafe")
    assert result["status"] == "rejected" and result["error"]["code"] == "INVALID_TASK_FILE"
    assert [f.event for f in workspace.frames("cafe")] == ["error"]
    [(kept, record)] = _records(workspace).items()
    assert record["original_name"] == "caf\\xe9.task.yaml"
    assert "not valid UTF-8" in record["message"] and record["hint"]
    assert (workspace.spool.failed / kept).exists() and kept.isascii()
    for line in caplog.records:  # what a log file would get: every line writable as UTF-8
        logs.JsonLinesFormatter().format(line).encode("utf-8")


async def test_a_hidden_file_is_left_while_fresh_and_refused_once_it_has_sat(
    workspace: Workspace, serve: Any
) -> None:
    fresh = workspace.spool.incoming / ".fresh.task.yaml"
    fresh.write_text(yaml.safe_dump(task("fresh")))
    old = workspace.spool.incoming / ".old.task.yaml"
    old.write_text(yaml.safe_dump(task("old")))
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    await serve()
    result = await wait_terminal(workspace, "old")
    assert result["status"] == "rejected" and result["error"]["code"] == "INVALID_TASK_FILE"
    [record] = _records(workspace).values()
    assert record["original_name"] == ".old.task.yaml" and "starts with '.'" in record["message"]
    assert fresh.exists() and workspace.result("fresh") is None


@pytest.fixture
def project_log() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in logs.CONFIGURED]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for handler in logging.getLogger(logs.ROOT).handlers:
        handler.close()
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate


@pytest.mark.parametrize("fmt", ["json", "pretty"])
def test_a_log_line_naming_a_file_that_is_not_utf8_is_written(
    tmp_path: Path, fmt: str, project_log: None, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "orch.log"
    stream = io.StringIO()
    logs.setup(fmt=fmt, log_file=log_file, stream=stream)
    name = os.fsdecode(b"caf\xe9.task.yaml")
    logs.emit(logs.get("intake"), "task.quarantined", f"Moved {name} to spool/failed/.", file=name)
    assert "Logging error" not in capsys.readouterr().err
    [line] = log_file.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["file"] == name
    assert "caf\\udce9" in stream.getvalue().encode("utf-8").decode("utf-8")


@pytest.mark.parametrize(
    ("no_color", "term", "colored"),
    [("", "xterm", True), ("1", "xterm", False), ("", "dumb", False)],
)
def test_the_pretty_log_is_coloured_only_where_the_user_did_not_say_no(
    project_log: None, monkeypatch: pytest.MonkeyPatch, no_color: str, term: str, colored: bool
) -> None:
    """NO_COLOR (no-color.org) and TERM=dumb turn the colours off on a terminal."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("NO_COLOR", no_color)
    monkeypatch.setenv("TERM", term)
    stream = Tty()
    logs.setup(fmt="auto", stream=stream)
    logs.emit(logs.get("daemon"), "daemon.failed", "down", level=40)
    assert ("\033[31m" in stream.getvalue()) is colored, stream.getvalue()


def test_a_plugins_log_line_is_json_and_in_the_log_file(tmp_path: Path, project_log: None) -> None:
    """plugins/ and state/ cannot import the project's logger: their lines still come out
    as JSON Lines on stderr and in --log-file, never as Python's bare last-resort lines."""
    log_file = tmp_path / "orch.log"
    stream = io.StringIO()
    logs.setup(fmt="json", log_file=log_file, stream=stream)
    logging.getLogger("plugins.engine_llamacpp").warning("cannot size %s from its header", "m")
    logging.getLogger("state.atomic").info("a state line")
    for text in (stream.getvalue(), log_file.read_text(encoding="utf-8")):
        lines = [json.loads(line) for line in text.splitlines()]
        assert [(x["event"], x["human"]) for x in lines] == [
            ("plugins.engine_llamacpp", "cannot size m from its header"),
            ("state.atomic", "a state line"),
        ]


# -- content that is hostile ----------------------------------------------------------------------

HOSTILE_INPUTS: dict[str, tuple[str, str]] = {
    "deep.task.json": ("[" * 900 + "]" * 900, "levels deep"),
    "deeper.task.json": ("[" * 100_000 + "]" * 100_000, "levels deep"),
    "flow.task.yaml": ("model: m1\nprompt: " + "[" * 3000 + "]" * 3000 + "\n", "levels deep"),
    "digits.task.yaml": ("model: m1\nprompt: hi\nmax_tokens: " + "9" * 5000 + "\n", "number"),
    "date.task.yaml": ("model: m1\nprompt: hi\nmax_tokens: 2\nseed: 2024-13-45\n", "month"),
    "twice.task.yaml": (
        "task_id: a\nmodel: m1\nprompt: hi\nmax_tokens: 2\ntask_id: a-second\n",
        "repeats the key 'task_id' of line 1",
    ),
    "twice.task.json": (
        '{"task_id": "j", "model": "m1", "prompt": "hi",\n "max_tokens": 2, "max_tokens": 3}',
        "repeats the key 'max_tokens'",
    ),
}


async def test_hostile_content_is_an_invalid_task_file_with_a_line_and_a_hint(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    for name, (text, _) in HOSTILE_INPUTS.items():
        workspace.submit(name, text)
    workspace.submit("after.task.yaml", task("after"))
    assert (await wait_terminal(workspace, "after"))["status"] == "succeeded"
    records = await wait_for(
        lambda: len(_records(workspace)) == len(HOSTILE_INPUTS) and _records(workspace),
        5,
        "an error file for every hostile file",
    )
    for name, (_, expected) in HOSTILE_INPUTS.items():
        record = records[name]
        assert record["code"] == "INVALID_TASK_FILE", (name, record["message"])
        assert expected in record["message"], (name, record["message"])
        assert record["line"] is not None and record["hint"], name
    assert workspace.result("a-second") is None and workspace.result("j") is None


async def test_a_task_behind_hostile_files_is_not_held_up(workspace: Workspace, serve: Any) -> None:
    await serve()
    began = time.monotonic()
    workspace.submit("alone.task.yaml", task("alone", max_tokens=4))
    await wait_terminal(workspace, "alone")
    alone = time.monotonic() - began

    workspace.submit("brackets.task.yaml", "prompt: " + "[" * 3000 + "]" * 3000 + "\n")
    keys = "".join(f"key_{i:05d}: 1\n" for i in range(10_000))
    workspace.submit("keys.task.yaml", "model: m1\nprompt: hi\nmax_tokens: 2\n" + keys)
    workspace.submit("items.task.json", '{"labels": [' + "0," * 500_000 + "0]}")
    began = time.monotonic()
    workspace.submit("behind.task.yaml", task("behind", max_tokens=4))
    assert (await wait_terminal(workspace, "behind", 60))["status"] == "succeeded"
    behind = time.monotonic() - began
    assert behind < 3 * alone + 1.0, f"{behind:.2f} s behind hostile files, {alone:.2f} s alone"
