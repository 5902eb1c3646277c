"""`orchctl status` tells a live daemon from the status file a dead one left behind."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from reconciler import clocks, probing
from tests.conftest import Workspace, wait_for
from tests.orchctl_support import dead_pid, fake_daemon_status, orchctl


def status_of(ws: Workspace, *extra: str) -> tuple[int, list[str], list[str]]:
    ran = orchctl("status", "--config", str(ws.config_path), *extra)
    return ran.code, ran.out_lines, ran.err_lines


def test_a_killed_daemon_shows_as_not_running_and_its_gpus_as_last_seen(
    workspace: Workspace,
) -> None:
    written = time.time() - 240
    pid = dead_pid()
    fake_daemon_status(workspace.root / ".orch", pid=pid, written_at=written)
    code, out, _ = status_of(workspace)
    assert code == 0
    assert out[0] == f"daemon   pid {pid}  NOT RUNNING (last status 4 min ago)  SIMULATED GPUs"
    label = f"GPUs, pools and queue: last seen at {clocks.rfc3339(written)}, not live"
    assert out[out.index(label) + 1].startswith("GPU ")


def test_a_zombie_daemon_is_not_running(workspace: Workspace, zombie_pid: int) -> None:
    fake_daemon_status(workspace.root / ".orch", pid=zombie_pid)
    _, out, _ = status_of(workspace)
    assert out[0].startswith(f"daemon   pid {zombie_pid}  NOT RUNNING (last status ")


def test_a_pid_now_used_by_a_younger_process_is_not_the_daemon(workspace: Workspace) -> None:
    fake_daemon_status(workspace.root / ".orch", started_at=time.time() - 7200)
    _, out, _ = status_of(workspace)
    assert "NOT RUNNING" in out[0]


def test_a_clean_stop_shows_when_it_stopped(workspace: Workspace) -> None:
    stopped = time.time() - 60
    fake_daemon_status(workspace.root / ".orch", state="stopped", stopped_at=stopped, pid=1)
    _, out, _ = status_of(workspace)
    assert out[0] == f"daemon   pid 1  stopped at {clocks.rfc3339(stopped)}  SIMULATED GPUs"
    assert f"GPUs, pools and queue: last seen at {clocks.rfc3339(stopped)}, not live" in out


def test_a_live_daemon_shows_as_running_without_a_not_live_label(workspace: Workspace) -> None:
    started = time.time()
    fake_daemon_status(workspace.root / ".orch", started_at=started)
    _, out, _ = status_of(workspace)
    assert out[0] == (
        f"daemon   pid {os.getpid()}  running since {clocks.rfc3339(started)}  SIMULATED GPUs"
    )
    assert not any("not live" in line for line in out)


def test_status_json_of_a_dead_daemon_is_the_file_with_a_warning(workspace: Workspace) -> None:
    pid = dead_pid()
    fake_daemon_status(workspace.root / ".orch", pid=pid)
    code, out, err = status_of(workspace, "--json")
    assert code == 0 and json.loads("\n".join(out))["daemon"]["pid"] == pid
    assert err[0].startswith(f"orchctl: warning: daemon pid {pid} is NOT RUNNING")


def test_a_damaged_status_file_is_said_so_with_what_rewrites_it(workspace: Workspace) -> None:
    (workspace.root / ".orch").mkdir(exist_ok=True)
    (workspace.root / ".orch" / "status.json").write_text('{"daemon": ')
    code, _, err = status_of(workspace)
    assert code == 1
    assert err == [
        "orchctl: .orch/status.json is not a status file this orchctl can read",
        "hint: the daemon writes it afresh as it serves; a running one rewrites it within "
        f"seconds, else start it: orchctl serve --config {workspace.config_path}",
    ]


def test_status_without_a_status_file_says_how_to_start_a_daemon(workspace: Workspace) -> None:
    code, _, err = status_of(workspace)
    assert code == 1
    assert err == [
        "orchctl: no status at .orch/status.json: no daemon has served this folder yet",
        f"hint: start one with: orchctl serve --config {workspace.config_path}",
    ]


def test_a_live_daemon_whose_status_is_not_touched_is_said_not_responding(
    workspace: Workspace,
) -> None:
    """Stopped by a signal or hung on a dead disk, it still runs, but passes no more."""
    started = time.time()  # (this process stands in for the daemon)
    fake_daemon_status(workspace.root / ".orch", started_at=started, written_at=started - 120)
    _, out, _ = status_of(workspace)
    assert out[0] == (
        f"daemon   pid {os.getpid()}  running since {clocks.rfc3339(started)}, NOT RESPONDING "
        "(status last written 2 min ago; a serving daemon touches it every 5 s)  SIMULATED GPUs"
    )
    # its tables are two minutes old too: said, as for a daemon that is gone
    when = clocks.rfc3339(started - 120)
    assert f"GPUs, pools and queue: last seen at {when}, not live" in out, out


async def test_a_serving_daemon_touches_its_status_while_nothing_changes(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(probing, "STATUS_TOUCH_S", 0.3)
    await serve()
    status = workspace.root / ".orch" / "status.json"
    await wait_for(status.exists, 10, "status.json written")
    touched = status.stat().st_mtime
    await wait_for(lambda: status.stat().st_mtime > touched + 0.2, 5, "status.json touched")
    _, out, _ = status_of(workspace)
    assert " running since " in out[0] and "NOT RESPONDING" not in out[0]
