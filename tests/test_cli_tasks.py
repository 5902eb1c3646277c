"""`orchctl submit`, `cancel`, `watch` and `tasks` as a user meets them: what each prints,
its exit code, and what it leaves (or must not leave) in the spool.

A daemon is stood in for by the files it writes: `.orch/status.json` naming a live pid (this
process) and, for a task, its event log and result (`play`). The real daemon runs in
tests/test_cli.py and features/.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler import cli_common, clocks
from state import events, results
from state.errors import ErrorCode, envelope
from tests.conftest import Workspace, full_disk_under, task
from tests.orchctl_support import (
    ORCHCTL,
    assert_clean,
    dead_pid,
    fake_daemon_status,
    orchctl,
)


def cfg(ws: Workspace) -> str:
    return str(ws.config_path)


def write_task(ws: Workspace, name: str, **fields: Any) -> Path:
    path = ws.root / name
    path.write_text(yaml.safe_dump(fields or task(name.split(".")[0])))
    return path


def finished(ws: Workspace, task_id: str, status: results.StatusName = "succeeded") -> None:
    ws.results.write(results.Result(task_id=task_id, status=status, tokens_out=3))


def serving(ws: Workspace) -> None:
    fake_daemon_status(ws.root / ".orch")


def cancel_requests(ws: Workspace) -> list[str]:
    return sorted(p.name for p in (ws.root / "spool" / "cancel").glob("*"))


def incoming(ws: Workspace) -> list[str]:
    return sorted(p.name for p in (ws.root / "spool" / "incoming").glob("*"))


def play(
    ws: Workspace,
    task_id: str,
    frames: list[tuple[events.EventName, dict[str, Any]]],
    result: results.Result,
) -> threading.Thread:
    """Do what the daemon does once the task's file arrives: its frames, then its result."""

    def run() -> None:
        deadline = time.monotonic() + 10
        while not incoming(ws) and time.monotonic() < deadline:
            time.sleep(0.01)
        name = incoming(ws)[0]  # claimed: the result names the file where it now lies
        (ws.spool.incoming / name).rename(ws.spool.active / name)
        result.source_file = f"spool/active/{name}"
        log = events.EventLog(ws.results.events_path(task_id))
        for name, data in frames:
            log.append(name, data, ts=clocks.rfc3339(time.time()))
            time.sleep(0.01)
        ws.results.write(result)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


STARTED: list[tuple[events.EventName, dict[str, Any]]] = [
    ("queued", {"queue_position": 0, "predicted_start_ms": 5}),
    ("started", {"pool_id": "p1", "replica_id": "p1-0", "attempt": 1}),
    ("token", {"t": "Hello", "i": 0}),
    ("token", {"t": " world", "i": 1}),
]


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_of_an_id_nobody_knows_exits_1_and_writes_no_request(
    workspace: Workspace,
) -> None:
    serving(workspace)
    ran = orchctl("cancel", "ghost", "--config", cfg(workspace))
    assert ran.code == 1
    assert ran.err_lines == [
        "orchctl: no task 'ghost' is queued, running or finished in this folder",
        "hint: `orchctl tasks` lists them",
    ]
    assert cancel_requests(workspace) == []  # nothing lies in wait for a later task "ghost"


def test_cancel_of_a_finished_task_says_there_is_nothing_to_cancel(workspace: Workspace) -> None:
    finished(workspace, "done-1")
    ran = orchctl("cancel", "done-1", "--config", cfg(workspace))
    assert (ran.code, ran.out_lines) == (0, ["task done-1 already succeeded; nothing to cancel"])
    assert cancel_requests(workspace) == []


def test_cancel_of_a_waiting_task_finds_it_by_the_task_id_inside_its_file(
    workspace: Workspace,
) -> None:
    serving(workspace)
    workspace.submit("some-name.task.yaml", task("inner-id"))
    ran = orchctl("cancel", "inner-id", "--config", cfg(workspace))
    assert ran.code == 0, ran.err
    assert ran.out_lines == [
        "cancel requested for inner-id (spool/incoming/some-name.task.yaml: waiting for the daemon)"
    ]
    assert cancel_requests(workspace) == ["inner-id"]
    assert orchctl("cancel", "some-name", "--config", cfg(workspace)).code == 1


def test_cancel_of_a_queued_task_writes_the_request(workspace: Workspace) -> None:
    serving(workspace)
    workspace.results.write(results.Result(task_id="q", status="queued"))
    ran = orchctl("cancel", "q", "--config", cfg(workspace))
    assert (ran.code, ran.out_lines) == (0, ["cancel requested for q (results/q.json: queued)"])
    assert cancel_requests(workspace) == ["q"]


def test_cancel_without_a_daemon_says_when_the_request_applies(workspace: Workspace) -> None:
    workspace.submit("w.task.yaml", task("w"))
    ran = orchctl("cancel", "w", "--config", cfg(workspace))
    assert ran.code == 0
    assert ran.err_lines == [
        "orchctl: no daemon is serving this folder: the cancel applies when "
        f"`orchctl serve --config {cfg(workspace)}` starts"
    ]


def test_cancel_reads_a_hostile_spool_without_crashing(workspace: Workspace) -> None:
    folder = workspace.spool.incoming
    (folder / "binary.task.yaml").write_bytes(b"\xff\xfe task_id: \x00")
    (folder / "a-folder.task.yaml").mkdir()
    os.mkfifo(folder / "fifo.task.yaml")
    (folder / "link.task.yaml").symlink_to("/dev/zero")
    (folder / "alias.task.yaml").write_text("a: &a [x]\ntask_id: *a\n")
    (folder / "big.task.yaml").write_bytes(b"task_id: big\n" + b"#" * (2 << 20))
    ran = orchctl("cancel", "ghost", "--config", cfg(workspace))
    assert ran.code == 1 and cancel_requests(workspace) == []
    assert orchctl("cancel", "binary", "--config", cfg(workspace)).code == 0


# -- submit ----------------------------------------------------------------------------------


def test_resubmitting_a_finished_task_is_refused_before_anything_is_delivered(
    workspace: Workspace,
) -> None:
    serving(workspace)
    finished(workspace, "x")
    path = write_task(workspace, "x.task.yaml")
    ran = orchctl("submit", path, "--wait", "--timeout", "5", "--config", cfg(workspace))
    assert ran.code == 1
    assert ran.err_lines == [
        "orchctl: task id 'x' is already used (results/x.json: succeeded) — DUPLICATE_TASK_ID",
        "hint: give the task a new task_id",
    ]
    assert ran.out == "" and incoming(workspace) == []


def test_an_id_whose_result_was_removed_but_whose_event_log_is_left_is_in_use(
    workspace: Workspace,
) -> None:
    """The daemon takes such an id for the earlier task (its frames are in the log): submit
    said nothing and delivered a task the daemon then refused without a result, and
    `submit --wait` replayed the old log as the new task's success."""
    serving(workspace)
    log = workspace.results.events_path("x")
    log.write_text('{"id": 1, "event": "end", "data": {"finish_reason": "length"}, "ts": ""}\n')
    ran = orchctl("submit", write_task(workspace, "x.task.yaml"), "--config", cfg(workspace))
    assert ran.code == 1
    assert ran.err_lines[0] == (
        "orchctl: task id 'x' is already used (results/x.events.jsonl: the event log of an "
        "earlier task, whose result file was removed) — DUPLICATE_TASK_ID"
    )
    assert incoming(workspace) == []
    gone = orchctl("cancel", "x", "--config", cfg(workspace))
    assert gone.code == 0 and "already ended (end in its event log" in gone.out, gone.out
    assert cancel_requests(workspace) == []


def test_submitting_an_id_a_waiting_file_already_claims_is_refused(workspace: Workspace) -> None:
    workspace.submit("other.task.yaml", task("y"))
    ran = orchctl("submit", write_task(workspace, "y.task.yaml"), "--config", cfg(workspace))
    assert ran.code == 1
    assert ran.err_lines[0] == (
        "orchctl: task id 'y' is already used "
        "(spool/incoming/other.task.yaml: waiting for the daemon) — DUPLICATE_TASK_ID"
    )
    assert incoming(workspace) == ["other.task.yaml"]


UNSAFE = (
    "{path}: task_id: the file name implies task id 'my task', which is not a task id "
    "(letters, digits, '.', '_' and '-' only) "
    "(hint: rename the file to my-task.task.yaml, or add `task_id: my-task`)"
)


def test_a_file_name_that_is_no_task_id_fails_validate_and_submit_alike(
    workspace: Workspace,
) -> None:
    path = workspace.root / "my task.task.yaml"
    path.write_text("model: m1\nprompt: hi\nmax_tokens: 3\n")
    checked = orchctl("validate", path)
    assert (checked.code, checked.out_lines) == (2, [UNSAFE.format(path=path)])
    submitted = orchctl("submit", path, "--config", cfg(workspace))
    assert (submitted.code, submitted.err_lines) == (2, [UNSAFE.format(path=path)])
    assert incoming(workspace) == []


async def test_the_daemon_and_validate_refuse_a_name_in_another_script_in_the_same_words(
    workspace: Workspace, serve: Any
) -> None:
    from tests.conftest import wait_for

    name = "café stem.task.yaml"
    body = "model: m1\nprompt: hi\nmax_tokens: 3\n"
    (workspace.root / name).write_text(body)
    checked = orchctl("validate", workspace.root / name)
    assert checked.code == 2
    assert "implies task id 'café stem', which is not a task id" in checked.out_lines[0]
    assert (
        "(hint: rename the file to cafe-stem.task.yaml, or add `task_id: cafe-stem`)"
        in (checked.out_lines[0])
    )
    await serve()
    workspace.submit(name, body)
    record = workspace.spool.failed / f"{name}.error.json"
    await wait_for(record.exists, 10, "the error record")
    error = json.loads(record.read_text())
    said = checked.out_lines[0].split(": task_id: ", 1)[1]
    assert error["message"].split(": task_id: ", 1)[1] + f" (hint: {error['hint']})" == said


def test_submit_without_a_daemon_delivers_and_says_so_at_once(workspace: Workspace) -> None:
    ran = orchctl(
        "submit", write_task(workspace, "t1.task.yaml"), "--config", cfg(workspace),
        cwd=workspace.root,
    )  # fmt: skip
    assert ran.code == 0
    assert ran.out_lines == [
        "submitted t1 → spool/incoming/t1.task.yaml",
        "result: results/t1.json",
    ]
    # from another folder, the paths printed are ones that open there
    other = workspace.root.parent / "elsewhere"
    other.mkdir()
    elsewhere = orchctl(
        "submit", write_task(workspace, "t2.task.yaml"), "--config", cfg(workspace), cwd=other
    )
    root = workspace.root.resolve()
    assert elsewhere.out_lines == [
        f"submitted t2 → {root}/spool/incoming/t2.task.yaml",
        f"result: {root}/results/t2.json",
    ]
    assert ran.err_lines == [
        "orchctl: no daemon is serving this folder: the task will run when "
        f"`orchctl serve --config {cfg(workspace)}` starts"
    ]
    assert incoming(workspace) == ["t1.task.yaml", "t2.task.yaml"]


def test_submit_on_a_full_disk_says_so_and_leaves_no_part_file(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_task(workspace, "t1.task.yaml")
    full_disk_under(workspace.root / "spool" / "tmp", monkeypatch)
    ran = orchctl("submit", path, "--config", cfg(workspace))
    assert ran.code == 3
    assert ran.err_lines == [
        f"orchctl: cannot deliver '{path}' into spool/incoming: No space left on device",
        "hint: make room on (or fix) the spool's disk, then submit again",
    ]
    assert incoming(workspace) == [] and list((workspace.root / "spool" / "tmp").iterdir()) == []


@pytest.mark.parametrize("daemon", ["no status", "stopped", "killed", "zombie", "reused pid"])
def test_submit_wait_without_a_daemon_exits_3_at_once(
    workspace: Workspace, daemon: str, zombie_pid: int
) -> None:
    state_dir = workspace.root / ".orch"
    if daemon == "stopped":
        fake_daemon_status(state_dir, state="stopped", stopped_at=time.time())
    elif daemon == "killed":
        fake_daemon_status(state_dir, pid=dead_pid())
    elif daemon == "zombie":
        fake_daemon_status(state_dir, pid=zombie_pid)
    elif daemon == "reused pid":  # this process runs, but it started after that "daemon"
        fake_daemon_status(state_dir, started_at=time.time() - 7200)
    path = write_task(workspace, "t2.task.yaml")
    began = time.monotonic()
    ran = orchctl("submit", path, "--wait", "--timeout", "8", "--config", cfg(workspace))
    assert time.monotonic() - began < 4
    assert ran.code == 3
    assert ran.err_lines[-1].startswith("orchctl: no daemon is serving this folder")
    assert incoming(workspace) == ["t2.task.yaml"]


def test_submit_wait_streams_the_text_then_prints_a_one_line_summary(
    workspace: Workspace,
) -> None:
    serving(workspace)
    timings = results.Timings(queue_ms=12, first_token_ms=35, decode_time_ms=910)
    end = ("end", {"tokens_out": 64, "finish_reason": "length"})
    result = results.Result(
        task_id="t3", status="succeeded", tokens_out=64, text="Hello world", timings=timings
    )
    play(workspace, "t3", [*STARTED, end], result)
    path = write_task(workspace, "t3.task.yaml")
    ran = orchctl(
        "submit", path, "--wait", "--timeout", "20", "--config", cfg(workspace), cwd=workspace.root
    )
    assert ran.code == 0, ran.err
    assert ran.out_lines == [
        "submitted t3 → spool/incoming/t3.task.yaml",
        "result: results/t3.json",
        "[queued at position 0, predicted start 5 ms]",
        "[started on p1-0 (pool p1)]",
        "Hello world",
        "succeeded: 64 tokens, queued 12 ms, first token 35 ms, 910 ms decoding",
    ]


def test_submit_wait_of_a_chat_answered_with_a_tool_call_shows_the_call(
    workspace: Workspace,
) -> None:
    """A chat whose answer is a tool call streams no text: the summary names the call (its
    arguments as the model wrote them, what does not print escaped)."""
    serving(workspace)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo\u001b[2J"}'},
    }
    end = ("end", {"tokens_out": 3, "finish_reason": "tool_calls"})
    result = results.Result(
        task_id="t5", status="succeeded", tokens_out=3, text="", tool_calls=[call]
    )
    play(workspace, "t5", [*STARTED, end], result)
    path = write_task(workspace, "t5.task.yaml")
    ran = orchctl("submit", path, "--wait", "--timeout", "20", "--config", cfg(workspace))
    assert ran.code == 0, ran.err
    assert ran.out_lines[-1] == (
        'succeeded: called get_weather({"city": "Oslo\\x1b[2J"}); 3 tokens'
    ), ran.out_lines


def test_submit_wait_of_a_failed_task_prints_code_message_and_hint_and_exits_1(
    workspace: Workspace,
) -> None:
    serving(workspace)
    error = envelope(ErrorCode.WORKER_RESET, "the engine died mid-stream", hint="retry it")
    result = results.Result(task_id="t4", status="failed", error=error)
    play(workspace, "t4", [*STARTED, ("error", error.model_dump(mode="json"))], result)
    path = write_task(workspace, "t4.task.yaml")
    ran = orchctl("submit", path, "--wait", "--timeout", "20", "--config", cfg(workspace))
    assert ran.code == 1
    assert ran.out_lines[-2:] == [
        "Hello world",
        "failed: WORKER_RESET: the engine died mid-stream (hint: retry it)",
    ]


def test_submit_wait_json_prints_the_whole_result_file_only(workspace: Workspace) -> None:
    serving(workspace)
    result = results.Result(task_id="t5", status="succeeded", tokens_out=2, text="Hello world")
    play(workspace, "t5", [*STARTED, ("end", {"tokens_out": 2})], result)
    path = write_task(workspace, "t5.task.yaml")
    ran = orchctl("submit", path, "--wait", "--json", "--config", cfg(workspace))
    assert ran.code == 0
    assert json.loads(ran.out) == result.model_dump(mode="json")


# -- watch -----------------------------------------------------------------------------------


def test_watch_of_an_unknown_id_says_so_at_once(workspace: Workspace) -> None:
    serving(workspace)
    began = time.monotonic()
    ran = orchctl("watch", "typo", "--timeout", "5", "--config", cfg(workspace))
    assert time.monotonic() - began < 2
    assert ran.code == 1
    assert ran.err_lines == [
        "orchctl: no task 'typo' in this folder",
        "hint: `orchctl tasks` lists them",
    ]


def test_watch_of_a_waiting_task_without_a_daemon_exits_3(workspace: Workspace) -> None:
    workspace.submit("w2.task.yaml", task("w2"))
    ran = orchctl("watch", "w2", "--timeout", "5", "--config", cfg(workspace))
    assert ran.code == 3
    assert ran.err_lines == [
        "orchctl: no daemon is serving this folder: task w2 is waiting in the spool and will "
        f"not move until `orchctl serve --config {cfg(workspace)}` starts"
    ]


def test_watch_of_a_task_whose_daemon_stopped_responding_exits_3(workspace: Workspace) -> None:
    """Its process runs (stopped by a signal, hung on a disk): waiting on would never end."""
    workspace.submit("w3.task.yaml", task("w3"))
    fake_daemon_status(workspace.root / ".orch", written_at=time.time() - 120)
    ran = orchctl("watch", "w3", "--timeout", "5", "--config", cfg(workspace))
    assert ran.code == 3
    assert ran.err_lines == [
        f"orchctl: the daemon (pid {os.getpid()}) has not responded for 2 min: task w3 is "
        "waiting in the spool and goes on when the daemon does",
        "hint: `orchctl status` shows it; restart the daemon if it is hung",
    ]


def test_submit_wait_to_a_daemon_that_stopped_responding_exits_3_at_once(
    workspace: Workspace,
) -> None:
    """As `watch` does: a frozen daemon would never take the task in, and waiting out the
    whole --timeout (600 s by default) told the user nothing."""
    fake_daemon_status(workspace.root / ".orch", written_at=time.time() - 120)
    path = workspace.root / "w4.task.yaml"
    path.write_text("model: m1\nprompt: hi\nmax_tokens: 4\n")
    began = time.monotonic()
    ran = orchctl("submit", path, "--wait", "--timeout", "20", "--config", cfg(workspace))
    assert time.monotonic() - began < 10
    assert ran.code == 3, ran.err
    assert ran.err_lines[-2:] == [
        f"orchctl: the daemon (pid {os.getpid()}) has not responded for 2 min: task w4 waits "
        "in spool/incoming/w4.task.yaml and is taken in when the daemon goes on",
        "hint: `orchctl status` shows it; restart the daemon if it is hung",
    ]


def test_watch_of_a_finished_task_prints_it_without_a_daemon(workspace: Workspace) -> None:
    log = events.EventLog(workspace.results.events_path("old"))
    for name, data in [*STARTED, ("end", {"tokens_out": 2, "finish_reason": "length"})]:
        log.append(name, data, ts="2026-01-01T00:00:00.000Z")  # type: ignore[arg-type]
    finished(workspace, "old")
    ran = orchctl("watch", "old", "--config", cfg(workspace))
    assert ran.code == 0
    assert ran.out_lines[-2:] == ["Hello world", "[end: length, 2 tokens]"]


def test_watch_of_a_finished_task_reads_the_files_not_a_daemon_that_stopped_responding(
    workspace: Workspace,
) -> None:
    """Its API port still takes connections (the kernel's backlog) but never answers: the
    stream would wait its read timeout (40 s) and its reconnects before the files."""
    import socket

    log = events.EventLog(workspace.results.events_path("old"))
    for name, data in [*STARTED, ("end", {"tokens_out": 2, "finish_reason": "length"})]:
        log.append(name, data, ts="2026-01-01T00:00:00.000Z")  # type: ignore[arg-type]
    finished(workspace, "old")
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        path = fake_daemon_status(workspace.root / ".orch", written_at=time.time() - 120)
        status = json.loads(path.read_text())
        status["daemon"]["url"] = f"http://127.0.0.1:{mute.getsockname()[1]}"
        path.write_text(json.dumps(status))
        os.utime(path, (time.time() - 120, time.time() - 120))
        began = time.monotonic()
        ran = orchctl("watch", "old", "--config", cfg(workspace))
    assert time.monotonic() - began < 5
    assert ran.code == 0 and ran.out_lines[-1] == "[end: length, 2 tokens]"


@pytest.mark.parametrize("verb", ["watch", "submit"])
def test_ctrl_c_stops_watching_and_leaves_the_task_running(workspace: Workspace, verb: str) -> None:
    serving(workspace)  # this test process plays the live daemon
    if verb == "watch":
        workspace.results.write(results.Result(task_id="long", status="running"))
        args = ["watch", "long"]
    else:
        args = ["submit", str(write_task(workspace, "long.task.yaml")), "--wait"]
    proc = subprocess.Popen(
        [str(ORCHCTL), *args, "--config", cfg(workspace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a terminal's foreground command: a test run started in the background (`make
        # test &`) hands its children SIGINT ignored, which Python then keeps ignoring
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        log = events.EventLog(workspace.results.events_path("long"))
        deadline = time.monotonic() + 20
        while not (workspace.results.exists("long") or incoming(workspace)):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if verb == "submit":  # taken in: the result names the file where it lies
            (workspace.spool.incoming / "long.task.yaml").rename(
                workspace.spool.active / "long.task.yaml"
            )
            workspace.results.write(
                results.Result(
                    task_id="long", status="running", source_file="spool/active/long.task.yaml"
                )
            )
        log.append("started", {"pool_id": "p1", "replica_id": "p1-0"}, ts="2026-01-01T00:00:00Z")
        assert proc.stdout is not None
        while "[started on p1-0" not in proc.stdout.readline():
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        log.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_clean(out + err)
    assert proc.returncode == 130
    assert err.splitlines()[-1] == (
        "stopped watching; task long keeps running (cancel it with: orchctl cancel long)"
    )


# -- tasks -----------------------------------------------------------------------------------


def _aged(ws: Workspace, task_id: str, seconds: float, **fields: Any) -> None:
    then = time.time() - seconds
    timings = results.Timings(accepted_at=clocks.rfc3339(then))
    ws.results.write(results.Result(task_id=task_id, timings=timings, **fields))
    os.utime(ws.results.path(task_id), (then, then))


def test_tasks_lists_results_and_waiting_files_newest_first(workspace: Workspace) -> None:
    _aged(workspace, "a", 7200, status="succeeded", pool_id="p1", tokens_out=64)
    _aged(workspace, "b", 240, status="failed", pool_id="p1", tokens_out=3)
    workspace.submit("c.task.yaml", task("c"))
    ran = orchctl("tasks", "--config", cfg(workspace))
    assert ran.code == 0
    assert ran.out_lines == [
        "ID        STATUS     POOL             TOKENS  AGE",
        "c         pending    -                        0 s",
        "b         failed     p1                    3  4 min",
        "a         succeeded  p1                   64  2 h",
    ]


def test_tasks_columns_never_run_together(workspace: Workspace) -> None:
    long_pool = "a-pool-with-a-rather-long-id"
    _aged(workspace, "x", 60, status="running", pool_id=long_pool, tokens_out=1234567)
    (workspace.root / "results" / "broken.json").write_text("{not json")
    ran = orchctl("tasks", "--config", cfg(workspace))
    rows = {line.split()[0]: line.split() for line in ran.out_lines[1:-1]}
    assert rows["x"][:3] == ["x", "running*", long_pool] and rows["x"][3] == "1234567"
    assert rows["broken"][:3] == ["broken", "unreadable", "-"]


def test_a_running_task_shows_the_tokens_its_log_has_so_far(workspace: Workspace) -> None:
    _aged(workspace, "r", 3, status="running", pool_id="p1", tokens_out=0)
    log = events.EventLog(workspace.results.events_path("r"))
    log.extend("queued", [{"queue_position": 0}], ts="t")
    log.extend("started", [{"replica_id": "p1-0"}], ts="t")
    log.extend("token", [{"t": "x", "i": i} for i in range(11)], ts="t")
    log.extend("metrics", [{"tokens_out": 11}], ts="t")
    log.extend("token", [{"t": "y", "i": 11}], ts="t")
    log.close()
    ran = orchctl("tasks", "--config", cfg(workspace))
    # no daemon serves the folder: the task stopped there, and the list says so
    assert ran.out_lines[1] == "r         running*    p1                   12  3 s"
    assert ran.out_lines[2].startswith("* no daemon is serving this folder: these tasks stopped")


def test_tasks_filters_by_status_limits_and_prints_json(workspace: Workspace) -> None:
    for i in range(5):
        _aged(workspace, f"ok-{i}", 100 - i, status="succeeded", tokens_out=i)
    _aged(workspace, "bad", 10, status="rejected")
    ran = orchctl(
        "tasks", "--status", "succeeded", "--limit", "2", "--json", "--config", cfg(workspace)
    )
    listed = json.loads(ran.out)
    assert [t["task_id"] for t in listed] == ["ok-4", "ok-3"]
    assert set(listed[0]) == {"task_id", "status", "pool_id", "tokens_out", "age_s"}
    none = orchctl("tasks", "--status", "canceled", "--config", cfg(workspace))
    assert none.out_lines == ["no canceled tasks in this folder"]


def test_the_queued_line_names_what_a_session_task_has_left(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """HME-020 in the CLI: `orchctl submit --wait` and `orchctl watch` print the session's
    budgets with the queue place; a task without a session gets the line as before."""
    from reconciler import cli_watch

    budgets = {
        "session_id": "agent",
        "turns_remaining": 4,
        "tokens_budget_remaining": 900,
        "ttl_ms_remaining": 599_990,
    }
    printer = cli_watch.Printer()
    for data in (
        {"queue_position": 2, "predicted_start_ms": 40, "budgets": budgets},
        {"queue_position": 0, "predicted_start_ms": 5, "budgets": None},
        {"queue_position": 1, "budgets": budgets | {"tokens_budget_remaining": None}},
    ):
        printer.frame(events.EventFrame(id=1, event="queued", data=data, ts="t"))
    assert capsys.readouterr().out.splitlines() == [
        "[queued at position 2, predicted start 40 ms; session agent: 4 turns, 900 tokens, "
        "600 s left]",
        "[queued at position 0, predicted start 5 ms]",
        "[queued at position 1; session agent: 4 turns, 600 s left]",
    ]


async def test_a_running_task_is_marked_only_while_no_daemon_serves_the_folder(
    workspace: Workspace, serve: Any
) -> None:
    from tests.conftest import config, wait_for

    cfg_yaml = config()
    cfg_yaml["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg_yaml)
    running = await serve()
    workspace.submit("slow.task.yaml", task("slow", max_tokens=400))
    await wait_for(lambda: (workspace.result("slow") or {}).get("status") == "running", 10)
    ran = orchctl("tasks", "--config", cfg(workspace))
    assert ran.out_lines[1].split()[:2] == ["slow", "running"], ran.out_lines
    assert len(ran.out_lines) == 2  # no footnote: the daemon runs it
    await running.stop()
    ran = orchctl("tasks", "--config", cfg(workspace))
    assert ran.out_lines[1].split()[:2] == ["slow", "running*"], ran.out_lines
    assert "go on when `orchctl serve" in ran.out_lines[-1]


def test_a_file_named_for_its_id_is_not_delivered_under_another_name(workspace: Workspace) -> None:
    """Its id is its file name: a waiting file of another task holding that name made the
    spool deliver it as `<ns>-z.task.yaml`, a task of another id, while submit said `z`."""
    workspace.submit("z.task.yaml", task("someone-else"))
    path = workspace.root / "z.task.yaml"
    path.write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    ran = orchctl("submit", path, "--config", cfg(workspace))
    assert ran.code == 1, ran.err
    assert ran.err_lines[0] == (
        "orchctl: spool/incoming/z.task.yaml is taken by a waiting file of another task; "
        "yours has no task_id, so its name is its id (z) and it cannot be delivered under "
        "another; nothing was delivered"
    )
    assert incoming(workspace) == ["z.task.yaml"]


def test_submit_wait_reports_its_own_files_refusal_not_another_files_task_of_its_id(
    workspace: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two submitters of one task id pass the id check together (neither saw the other's
    file yet): the daemon runs the file it took first and refuses the other as a duplicate.
    The second `submit --wait` reports that refusal, exit 1: it never follows the first
    file's task (its result and frames carry the same id) as its own."""
    serving(workspace)
    monkeypatch.setattr(cli_common, "lookup", lambda folder, task_id: None)  # the race
    first = workspace.submit("first.task.yaml", task("dup"))
    filed = workspace.spool.done / "first.task.yaml"
    first.rename(filed)
    log = events.EventLog(workspace.results.events_path("dup"))
    for name, data in [*STARTED, ("end", {"tokens_out": 2})]:
        log.append(name, data, ts=clocks.rfc3339(time.time()))
    workspace.results.write(
        results.Result(
            task_id="dup",
            status="succeeded",
            tokens_out=2,
            source_file="spool/done/first.task.yaml",
        )
    )

    def refuse() -> None:  # what the daemon does with the second file
        deadline = time.monotonic() + 10
        while not incoming(workspace) and time.monotonic() < deadline:
            time.sleep(0.01)
        name = incoming(workspace)[0]
        record = {
            "code": "DUPLICATE_TASK_ID",
            "message": "task id 'dup' is already used (see results/dup.json)",
            "hint": "give the task a new task_id",
        }
        (workspace.spool.failed / f"{name}.error.json").write_text(json.dumps(record))
        (workspace.spool.incoming / name).rename(workspace.spool.failed / name)

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    second = write_task(workspace, "second.task.yaml", **task("dup", prompt="another"))
    ran = orchctl("submit", second, "--wait", "--timeout", "5", "--config", cfg(workspace))
    thread.join()
    assert ran.code == 1, ran
    assert "Hello world" not in ran.out and "succeeded" not in ran.out  # not the first's
    assert ran.err_lines[0].startswith("orchctl: spool/failed/dup.task.yaml was refused")
    assert "DUPLICATE_TASK_ID: task id 'dup' is already used" in ran.err_lines[0]
    assert ran.err_lines[1] == "hint: give the task a new task_id"


def test_a_bad_url_is_refused_before_submit_delivers_anything(workspace: Workspace) -> None:
    """Refused after the delivery, exit 2 told the user nothing was sent while the task ran
    (and the same file sent again was a duplicate)."""
    serving(workspace)
    path = write_task(workspace, "u1.task.yaml")
    for url in ("ftp://x", "notaurl", ""):
        ran = orchctl("submit", path, "--wait", "--url", url, "--config", cfg(workspace))
        assert ran.code == 2 and "argument --url:" in ran.err, ran
        assert incoming(workspace) == []
    ran = orchctl("cancel", "u1", "--url", "notaurl", "--config", cfg(workspace))
    assert ran.code == 2 and "argument --url:" in ran.err


@pytest.mark.parametrize("damage", [b'{"task_id": "fake", "status": ', b"\xff\xfe", b"[1, 2]"])
def test_watch_of_a_damaged_result_nothing_will_change_ends_at_once(
    workspace: Workspace, damage: bytes
) -> None:
    """A result file that is no result, no event log, and no file of the task in the spool:
    nothing will ever change it, so watch says so at once instead of waiting out
    --timeout (600 s by default) with the hint to wait again."""
    serving(workspace)
    (workspace.root / "results").mkdir(exist_ok=True)
    (workspace.root / "results" / "fake.json").write_bytes(damage)
    began = time.monotonic()
    ran = orchctl("watch", "fake", "--timeout", "30", "--config", cfg(workspace))
    assert time.monotonic() - began < 5
    assert ran.code == 1, ran
    assert ran.err_lines[0].startswith("orchctl: task fake is of unknown state (results/fake.json")
    assert "nothing will change it" in ran.err_lines[0]
    assert ran.err_lines[1].startswith("hint: put the right fake.json back")


def test_the_cli_reads_the_folders_the_daemon_serves_until_it_applies_a_paths_edit(
    workspace: Workspace,
) -> None:
    """orch.yaml's paths: changed while a daemon serves: it keeps the folders it started
    with until it restarts, and so do tasks, watch and cancel (they found no task where the
    edit pointed, while the daemon ran them in the old folders)."""
    from tests.orchctl_support import fake_daemon_status

    old_results = workspace.root / "results"
    fake_daemon_status(
        workspace.root / ".orch",
        paths={
            "spool": str((workspace.root / "spool").resolve()),
            "results": str(old_results.resolve()),
            "state": str((workspace.root / ".orch").resolve()),
        },
    )
    finished(workspace, "kept")
    text = workspace.config_path.read_text()
    workspace.config_path.write_text(
        text.replace("version: 1", "version: 1\npaths: {results: moved}", 1)
    )
    ran = orchctl("tasks", "--config", cfg(workspace))
    assert ran.code == 0 and "kept" in ran.out, ran
    assert "uses the folders it started with" in ran.err and "until it restarts" in ran.err
    ran = orchctl("watch", "kept", "--config", cfg(workspace))
    assert ran.code == 0, ran


def test_submit_from_a_closed_standard_input_is_a_usage_error_not_a_bug(
    workspace: Workspace,
) -> None:
    """`orchctl submit - <&-`: no standard input at all; said plainly, exit 2."""
    from tests.orchctl_support import ORCHCTL

    done = subprocess.run(
        ["bash", "-c", f"{ORCHCTL} submit - --config {cfg(workspace)} <&-"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "standard input is closed" in done.stderr and "unexpected" not in done.stderr


def test_tasks_json_is_utf8_json_whatever_the_file_names(workspace: Workspace) -> None:
    """A task file whose name is not UTF-8 (caf\\xe9.task.yaml): `tasks --json` writes it
    as a JSON escape, so a strict reader takes the output, not raw bytes it refuses."""
    from tests.orchctl_support import ORCHCTL

    name = os.fsencode(workspace.spool.incoming) + b"/caf\xe9.task.yaml"
    with open(name, "wb") as fh:
        fh.write(b"model: m1\nprompt: hi\nmax_tokens: 3\n")
    done = subprocess.run(
        [str(ORCHCTL), "tasks", "--json", "--config", cfg(workspace)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.decode("utf-8"))  # strict: raw 0xe9 would raise
    shown = [r["task_id"] for r in rows]
    assert any(os.fsencode(i).startswith(b"caf\xe9") for i in shown), shown


@pytest.mark.parametrize("as_json", [False, True])
def test_watch_of_a_task_nothing_holds_ends_when_its_log_was_cut_and_its_result_damaged(
    workspace: Workspace, as_json: bool
) -> None:
    """The end frame cut from its log, its result not readable, no file of it in the
    spool: nothing holds the task, so watch (--json too, which reads the files) ends within
    a few seconds, naming the damage, instead of waiting out --timeout."""
    serving(workspace)
    log = events.EventLog(workspace.results.events_path("cut"))
    log.append("queued", {"queue_position": 0}, ts=clocks.rfc3339(time.time()))
    log.append("started", {"attempt": 1}, ts=clocks.rfc3339(time.time()))
    (workspace.root / "results" / "cut.json").write_bytes(b"{bad")
    began = time.monotonic()
    extra = ["--json"] if as_json else []
    ran = orchctl("watch", "cut", *extra, "--timeout", "30", "--config", cfg(workspace))
    assert time.monotonic() - began < 10, ran
    assert ran.code == 1, ran
    assert "results/cut.json" in ran.out + ran.err, ran
