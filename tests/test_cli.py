"""`orchctl` as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import INVENTORY, Workspace, config, task, wait_terminal

ROOT = Path(__file__).resolve().parents[1]


def orchctl(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *args],
        input=(stdin.decode() if stdin is not None else None),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_validate_accepts_the_examples() -> None:
    example = ROOT / "examples" / "01-simulated-workstation"
    files = [
        example / "orch.yaml",
        example / "inventory.yaml",
        *sorted((example / "tasks").glob("*")),
    ]
    proc = orchctl("validate", *map(str, files))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == len(files)


def test_validate_prints_file_line_field_and_hint_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "orch.yaml"
    bad.write_text("version: 1\nqueue:\n  capacty: 3\n")
    proc = orchctl("validate", str(bad))
    assert proc.returncode == 2
    assert (
        f"{bad}:3:3: queue.capacty: unknown key 'capacty' (hint: did you mean 'capacity'?)"
        in proc.stdout
    )


def test_serve_without_an_nvidia_driver_exits_3_with_the_fix(tmp_path: Path) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover - only on a machine with a driver
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA driver")
    (tmp_path / "orch.yaml").write_text(
        'version: 1\nmodels: {m: {ref: "file:m.gguf", size_mib: 10}}\n'
        "pools: [{id: p, engine: llamacpp, model: m}]\n"
    )
    proc = orchctl("serve", "--config", str(tmp_path / "orch.yaml"), "--duration", "1")
    assert proc.returncode == 3
    assert "pacman -S" in proc.stderr and "apt install" in proc.stderr
    assert "--simulate" in proc.stderr


def test_serve_refuses_an_invalid_config_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "orch.yaml").write_text("version: 1\npools: [{id: p}]\n")
    log_file = tmp_path / "serve.jsonl"
    proc = orchctl("serve", "--config", str(tmp_path / "orch.yaml"), "--log-file", str(log_file))
    assert proc.returncode == 2 and "orch.yaml:2" in proc.stderr
    # stderr is no terminal here (`> serve.log 2>&1`): JSON by default, so `jq -r .human`
    # reads why nothing is served; and the log file has it too
    for text in (proc.stderr, log_file.read_text()):
        records = [json.loads(line) for line in text.splitlines()]
        assert records and {r["event"] for r in records} == {"config.invalid"}, text
    # with JSON logs on stderr, every line there is JSON, the refusal's too
    proc = orchctl("serve", "--config", str(tmp_path / "orch.yaml"), "--log-format", "json")
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert proc.returncode == 2 and lines, proc.stderr
    assert {r["event"] for r in lines} == {"config.invalid"}, lines
    assert all(r["level"] == "error" and r["line"] == 2 for r in lines), lines
    assert "orch.yaml:2" in lines[0]["human"]
    # a folder of paths: the system refuses: one JSON record too, naming the path
    (tmp_path / "afile").write_text("x")
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    (tmp_path / "orch.yaml").write_text(yaml.safe_dump(config(paths={"results": "afile"})))
    proc = orchctl("serve", "--config", str(tmp_path / "orch.yaml"), "--log-format", "json")
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert proc.returncode == 2, proc.stderr
    failed = [r for r in lines if r["event"] == "daemon.failed"]
    assert failed and failed[0]["human"].startswith(f"{tmp_path}/afile: File exists"), lines


async def test_submit_from_stdin_watch_and_status(workspace: Workspace, serve: Any) -> None:
    await serve()
    cfg = str(workspace.config_path)
    proc = orchctl(
        "submit",
        "-",
        "--config",
        cfg,
        stdin=b"task_id: piped\nmodel: m1\nprompt: hi\nmax_tokens: 5\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert (await wait_terminal(workspace, "piped"))["status"] == "succeeded"
    watched = orchctl("watch", "piped", "--config", cfg)
    assert watched.returncode == 0
    assert workspace.result("piped")["text"] in watched.stdout  # type: ignore[index]
    assert "[end: length, 5 tokens]" in watched.stdout
    status = orchctl("status", "--config", cfg)
    assert status.returncode == 0
    assert "SIMULATED" in status.stdout and "p1-0" in status.stdout and "Ready" in status.stdout


async def test_submit_wait_against_a_real_daemon_streams_then_summarizes(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    path = workspace.root / "real.task.yaml"
    path.write_text("task_id: real\nmodel: m1\nprompt: hi\nmax_tokens: 5\n")
    proc = await asyncio.to_thread(  # from orch.yaml's folder, as the user would
        orchctl, "submit", str(path), "--wait", "--config", "orch.yaml", cwd=workspace.root
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == [
        "submitted real → spool/incoming/real.task.yaml",
        "result: results/real.json",
    ]
    assert "[started on p1-0 (pool p1)]" in lines
    assert lines[-2] == workspace.result("real")["text"]  # type: ignore[index]
    assert lines[-1].startswith("succeeded: 5 tokens, queued ")
    assert lines[-1].endswith(" ms decoding") and "None" not in lines[-1]


async def test_submit_refuses_an_invalid_task_before_it_reaches_the_spool(
    workspace: Workspace,
) -> None:
    bad = workspace.root / "bad.task.yaml"
    bad.write_text("model: m1\nprompt: hi\n")
    proc = orchctl("submit", str(bad), "--config", str(workspace.config_path))
    assert proc.returncode == 2 and "max_tokens" in proc.stderr
    assert list(workspace.spool.incoming.iterdir()) == []


async def test_submit_refuses_a_file_name_the_spool_could_not_keep(
    workspace: Workspace,
) -> None:
    long = workspace.root / ("a" * 200 + ".task.yaml")
    long.write_text("model: m1\nprompt: hi\nmax_tokens: 2\n")
    proc = orchctl("submit", str(long), "--config", str(workspace.config_path))
    assert proc.returncode == 2 and "task_id" in proc.stderr and "Traceback" not in proc.stderr
    assert list(workspace.spool.incoming.iterdir()) == []


def test_validate_reports_a_key_given_twice_in_orch_yaml_with_both_lines(
    workspace: Workspace,
) -> None:
    text = workspace.config_path.read_text()
    workspace.config_path.write_text(
        text.replace("  replicas: 1\n", "  replicas: 1\n  replicas: 0\n")
    )
    proc = orchctl("validate", str(workspace.config_path))
    assert proc.returncode == 2, proc.stdout
    assert "pools[0].replicas: repeats the key 'replicas' of line" in proc.stdout


async def test_watch_of_a_rejected_task_exits_1(workspace: Workspace, serve: Any) -> None:
    await serve()
    workspace.submit("r.task.yaml", task("r", model="nope"))
    await wait_terminal(workspace, "r")
    proc = orchctl("watch", "r", "--config", str(workspace.config_path))
    assert proc.returncode == 1 and "MODEL_UNKNOWN" in proc.stdout


def test_plugins_lists_the_built_ins() -> None:
    proc = orchctl("plugins")
    assert proc.returncode == 0
    for name in ("nvml", "simulated", "sim", "llamacpp"):
        assert name in proc.stdout


async def test_status_and_cancel_still_work_while_orch_yaml_is_broken(
    workspace: Workspace, serve: Any
) -> None:
    await serve()
    workspace.submit("t9.task.yaml", task("t9"))
    await wait_terminal(workspace, "t9")
    workspace.config_path.write_text(workspace.config_path.read_text() + "pools: [oops\n")
    proc = orchctl("status", "--config", str(workspace.config_path))
    assert proc.returncode == 0, proc.stderr
    assert (
        "is not valid YAML" in proc.stderr
        and "keeps its last good config" in proc.stderr
        and "p1-0" in proc.stdout
    )
    canceled = orchctl("cancel", "t9", "--config", str(workspace.config_path))
    assert canceled.returncode == 0 and "nothing to cancel" in canceled.stdout
    assert orchctl("cancel", "t10", "--config", str(workspace.config_path)).returncode == 1


async def test_watch_json_prints_the_logs_frames_with_their_times_while_the_api_is_up(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    workspace.submit(
        "timed.task.yaml", {"task_id": "timed", "model": "m1", "prompt": "hi", "max_tokens": 3}
    )
    await wait_terminal(workspace, "timed")
    cfg = str(workspace.config_path)
    watched = await asyncio.to_thread(orchctl, "watch", "timed", "--json", "--config", cfg)
    assert watched.returncode == 0, watched.stderr
    printed = [json.loads(line) for line in watched.stdout.splitlines()]
    logged = [f.model_dump(mode="json") for f in workspace.frames("timed")]
    assert printed == logged and all(f["ts"] for f in printed)
    url = str(running.daemon.server.url)
    args = ("watch", "timed", "--json", "--url", url, "--config", cfg)
    over_sse = await asyncio.to_thread(orchctl, *args)
    frames = [json.loads(line) for line in over_sse.stdout.splitlines()]
    assert [f["id"] for f in frames] == [f["id"] for f in logged]
    assert all("ts" not in f for f in frames)  # SSE carries no time: left out, never ""


def test_a_daemon_that_cannot_listen_says_why_in_its_json_log_and_never_said_it_served(
    workspace: Workspace,
) -> None:
    import socket

    import yaml

    from tests.conftest import config

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = config(server={"bind": f"127.0.0.1:{port}"})
        workspace.config_path.write_text(yaml.safe_dump(cfg))
        log_file = workspace.root / "daemon.jsonl"
        proc = orchctl(
            "serve",
            "--config",
            str(workspace.config_path),
            "--log-format",
            "json",
            "--log-file",
            str(log_file),
            "--duration",
            "5",
        )
    assert proc.returncode == 2, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line JSON
    events = [r["event"] for r in records]
    assert events[-1] == "daemon.failed" and "daemon.started" not in events, events
    assert records[-1]["level"] == "error" and "cannot listen" in records[-1]["human"]
    assert "daemon.failed" in log_file.read_text()


def test_a_log_file_in_a_folder_that_does_not_exist_is_refused_not_made(
    workspace: Workspace,
) -> None:
    from tests.orchctl_support import orchctl

    missing = workspace.root / "no-such-folder" / "daemon.jsonl"
    ran = orchctl("serve", "--config", workspace.config_path, "--log-file", missing)
    assert ran.code == 2
    said, hint = ran.err_lines
    assert said.startswith("orchctl: --log-file '/") and said.endswith(
        "': it cannot be opened: No such file or directory"
    )
    assert hint == "hint: name a file in a folder that exists and that you may write to"
    assert not missing.parent.exists()


@pytest.mark.parametrize("delay_s", [0.05, 0.3])
def test_serve_stopped_in_its_first_second_still_stops_cleanly_with_exit_0(
    workspace: Workspace, delay_s: float
) -> None:
    """A service manager stopping a unit it has just started: SIGTERM while orchctl still
    loads its modules was fatal (exit 143, nothing logged). The signal is kept until the
    daemon's own handlers are in place, and the daemon then stops as on any SIGTERM."""
    import contextlib
    import os
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler.entry", "serve", "--config", str(workspace.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its engines are in its group: a failed run leaves none
    )
    try:
        time.sleep(delay_s)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 0, out
    assert '"daemon.stopped"' in out, out


@pytest.mark.parametrize(("sent", "ends"), [("SIGTERM", -15), ("SIGINT", 130)])
def test_a_verb_that_is_not_a_daemon_ends_on_an_early_signal_as_usual(
    tmp_path: Path, sent: str, ends: int
) -> None:
    """Only a daemon keeps a signal that came while orchctl loaded: `orchctl status` (here
    stopped before it could ask anything) ends as if nothing had caught the signal; Ctrl-C
    as Ctrl-C does, exit 130 without a traceback."""
    script = (
        "import os, signal, sys\n"
        "from reconciler import early_signals\n"
        "sys.argv = ['orchctl', 'status', '--config', sys.argv[1]]\n"
        "early_signals.install()\n"
        f"os.kill(os.getpid(), signal.{sent})\n"  # arrives 'while loading'
        "from reconciler import cli\n"
        "raise SystemExit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "orch.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == ends, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage", ["removed", "torn"])
async def test_a_daemon_whose_status_file_was_removed_is_still_seen_serving(
    workspace: Workspace, serve: Any, damage: str
) -> None:
    """status.json removed (or torn) by hand while the daemon serves: the daemon writes it
    again within seconds, and the CLI waits for that (the daemon holds the folder's lock)
    rather than say no daemon serves and tell the user to start one that cannot start."""
    await serve()
    status = workspace.root / ".orch" / "status.json"
    if damage == "removed":
        status.unlink()
    else:
        status.write_text("{")
    shown = await asyncio.to_thread(orchctl, "status", "--config", str(workspace.config_path))
    assert shown.returncode == 0, shown.stderr
    assert "no daemon has served" not in shown.stdout + shown.stderr
    assert "p1-0" in shown.stdout, shown.stdout
