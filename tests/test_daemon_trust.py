"""The daemon as a newcomer meets it from outside: one daemon per folder, clean stops on every
signal a terminal sends, cancel requests that cannot hit the wrong task or be lost by a crash.
Each runs `orchctl serve` as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from state import spool
from tests.conftest import Workspace, config, task

pytestmark = pytest.mark.slow


def _serve(ws: Workspace, *extra: str, failpoint: str | None = None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop("ORCH_FAILPOINTS", None)
    if failpoint:
        env["ORCH_FAILPOINTS"] = f"{failpoint}=kill"
    argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config", str(ws.config_path)]
    argv += ["--resync", "0.2", *extra]
    with open(ws.root / "serve.out", "ab") as out:  # a file: a full pipe would block it
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ws.root)


def _wait(check: Any, timeout: float = 15.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except (OSError, ValueError, KeyError, IndexError, StopIteration, TypeError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(ws: Workspace) -> bool:
    status = ws.status()
    return status["daemon"]["state"] == "running" and all(
        p["state"] == "Ready" for p in status["pools"]
    )


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


def _engine_pids(ws: Workspace) -> list[int]:
    return [r["pid"] for p in ws.status()["pools"] for r in p["replicas"] if r["pid"]]


def test_a_refused_second_daemon_leaves_the_last_good_config_alone(workspace: Workspace) -> None:
    """A second daemon started on another orch.yaml of the same folder is refused by the
    lock; the copy of the config the first one serves (.orch/last-good.yaml, what a restart
    falls back to) stays the first one's."""
    first = _serve(workspace)
    try:
        _wait(lambda: _ready(workspace), what="the first daemon Ready")
        last_good = workspace.root / ".orch" / "last-good.yaml"
        kept = _wait(lambda: last_good.read_bytes(), what="the last good copy")
        other = workspace.root / "other.yaml"
        other.write_text(workspace.config_path.read_text() + "# another\n")
        argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config", str(other)]
        second = subprocess.run(argv, capture_output=True, timeout=60, cwd=workspace.root)
        assert second.returncode == 2 and b"another daemon" in second.stderr
        assert last_good.read_bytes() == kept
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


def test_a_second_daemon_on_the_same_folder_is_refused_and_touches_nothing(
    workspace: Workspace,
) -> None:
    first = _serve(workspace)
    try:
        _wait(lambda: _ready(workspace), what="the first daemon Ready")
        engines = _engine_pids(workspace)
        (workspace.root / "serve.out").write_bytes(b"")
        second = _serve(workspace)
        assert second.wait(timeout=30) == 2
        text = (workspace.root / "serve.out").read_text()
        assert f"another daemon (pid {first.pid}) serves this folder since" in text
        assert "Traceback" not in text
        assert "Applied" not in text  # it applied nothing: the first daemon serves
        time.sleep(0.5)
        assert all(_alive(pid) for pid in engines)  # not adopted, not stopped
        assert _engine_pids(workspace) == engines and _ready(workspace)
        workspace.submit("after.task.yaml", task("after"))
        _wait(lambda: (workspace.result("after") or {}).get("status") == "succeeded")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


@pytest.mark.parametrize("shared", ["spool", "results"])
def test_a_daemon_of_another_config_sharing_a_spool_or_results_folder_is_refused(
    workspace: Workspace, shared: str
) -> None:
    first = _serve(workspace)
    try:
        _wait(lambda: _ready(workspace), what="the first daemon Ready")
        other = workspace.root / "other"
        other.mkdir()
        cfg = config()
        cfg["gpus"]["inventory"] = "../inventory.yaml"
        cfg["paths"] = {shared: f"../{shared}"}  # its own state, this folder's spool/results
        for name in ("m1.gguf", "old.gguf"):
            if (workspace.root / name).exists():
                (other / name).write_bytes((workspace.root / name).read_bytes())
        (other / "orch.yaml").write_text(json.dumps(cfg))
        workspace.submit("slow.task.yaml", task("slow", max_tokens=8))
        argv = [sys.executable, "-m", "reconciler.cli", "serve", "--config"]
        second = subprocess.run(
            [*argv, str(other / "orch.yaml"), "--duration", "10"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert f"another daemon (pid {first.pid}) uses {workspace.root / shared}" in second.stderr
        assert "Traceback" not in second.stderr
        done = _wait(lambda: (workspace.result("slow") or {}).get("status") == "succeeded")
        assert done
        starts = [f for f in workspace.frames("slow") if f.event == "started"]
        assert len(starts) == 1  # run once, by the first daemon only
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_every_terminal_signal_stops_the_daemon_and_its_engines_cleanly(
    workspace: Workspace, sig: signal.Signals
) -> None:
    daemon = _serve(workspace, "--log-file", str(workspace.root / "daemon.log"))
    _wait(lambda: _ready(workspace), what="Ready")
    engines = _engine_pids(workspace)
    daemon.send_signal(sig)
    assert daemon.wait(timeout=30) == 0
    log = (workspace.root / "daemon.log").read_text()
    assert f"Stopping on {sig.name}." in log and '"event": "daemon.stopped"' in log
    status = workspace.status()
    assert status["daemon"]["state"] == "stopped" and status["daemon"]["stopped_at"]
    time.sleep(0.3)
    assert [pid for pid in engines if _alive(pid)] == []
    assert list((workspace.root / ".orch" / "engines").glob("*.json")) == []


def test_a_stop_lets_a_running_task_finish_within_the_drain_time(workspace: Workspace) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    daemon = _serve(workspace)
    _wait(lambda: _ready(workspace), what="Ready")
    workspace.submit("slow.task.yaml", task("slow", max_tokens=20))  # about 1 s of tokens
    _wait(lambda: (workspace.result("slow") or {}).get("status") == "running")
    daemon.send_signal(signal.SIGINT)
    assert daemon.wait(timeout=30) == 0
    assert workspace.result("slow")["status"] == "succeeded"  # type: ignore[index]


def test_a_cancel_for_an_unknown_id_never_cancels_a_task_that_arrives_later(
    workspace: Workspace,
) -> None:
    daemon = _serve(workspace)
    try:
        _wait(lambda: _ready(workspace), what="Ready")
        stale = spool.request_cancel(workspace.spool, "ghost")
        old = time.time() - 120  # written two minutes before any task of that id
        os.utime(stale, (old, old))
        _wait(lambda: not stale.exists(), what="the stale request dropped")
        workspace.submit("ghost.task.yaml", task("ghost"))
        _wait(lambda: (workspace.result("ghost") or {}).get("status") == "succeeded")
        # a request racing just ahead of its task file is honoured
        spool.request_cancel(workspace.spool, "racer")
        cfg_task = task("racer", max_tokens=400)
        workspace.submit("racer.task.yaml", cfg_task)
        _wait(lambda: (workspace.result("racer") or {}).get("status") == "canceled")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_an_acknowledged_cancel_survives_a_crash_before_the_task_ends(
    workspace: Workspace,
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 20, "load_s": 0.0}
    workspace.write_config(cfg)
    first = _serve(workspace, failpoint="after_cancel_ack")
    _wait(lambda: _ready(workspace), what="Ready")
    workspace.submit("long.task.yaml", task("long", max_tokens=200))
    _wait(lambda: (workspace.result("long") or {}).get("status") == "running")
    spool.request_cancel(workspace.spool, "long")
    assert first.wait(timeout=30) == -signal.SIGKILL
    second = _serve(workspace, "--exit-when-idle")
    assert second.wait(timeout=60) == 0
    result = workspace.result("long")
    assert result is not None and result["status"] == "canceled"
    starts = [
        json.loads(line)
        for line in (workspace.root / "results" / "long.events.jsonl").read_text().splitlines()
        if '"started"' in line
    ]
    assert len(starts) == 1  # never re-run after the acknowledged cancel
    assert list(workspace.spool.cancel.iterdir()) == []


def test_the_folder_locks_name_their_holder_and_allow_one_folder_named_twice(
    tmp_path: Path,
) -> None:
    from state import daemon_lock

    shared = tmp_path / "data"
    for d in (shared, tmp_path / "a", tmp_path / "b"):
        d.mkdir()
    first = daemon_lock.acquire(tmp_path / "a", started_at="t0", shared=(shared, shared))
    try:
        with pytest.raises(daemon_lock.Held) as held:
            daemon_lock.acquire(tmp_path / "b", started_at="t1", shared=(shared,))
        assert f"another daemon (pid {os.getpid()}) uses {shared}" in str(held.value)
        assert list(shared.iterdir()) == []  # no lock file among the user's
    finally:
        first.release()
    again = daemon_lock.acquire(tmp_path / "b", started_at="t2", shared=(shared,))
    again.release()


@pytest.mark.parametrize("helper_lingers_s", [0.4, None])
def test_a_restart_waits_for_the_locks_a_killed_daemons_helper_still_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper_lingers_s: float | None
) -> None:
    """SIGKILL a daemon whose helper (it holds the daemon's locks) is still dying: the
    next daemon waits for it instead of refusing to start on behalf of a pid that no
    longer runs. A helper that never lets go is refused after DYING_HOLDER_S, naming the
    dead daemon."""
    from state import daemon_lock

    monkeypatch.setattr(daemon_lock, "DYING_HOLDER_S", 2.0)
    state, shared = tmp_path / "state", tmp_path / "results"
    state.mkdir()
    shared.mkdir()
    linger = "60" if helper_lingers_s is None else str(helper_lingers_s)
    script = textwrap.dedent(
        f"""
        import subprocess, sys, time
        from pathlib import Path
        from state import daemon_lock
        lock = daemon_lock.acquire(
            Path(sys.argv[1]), started_at="t0", shared=[Path(sys.argv[2])]
        )
        helper = subprocess.Popen(["sleep", "{linger}"], pass_fds=[lock.fd, *lock.shared])
        print(helper.pid, flush=True)
        time.sleep(60)
        """
    )
    root = Path(daemon_lock.__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", script, str(state), str(shared)],
        stdout=subprocess.PIPE,
        cwd=root,
        text=True,
    ) as daemon:
        assert daemon.stdout is not None
        helper = int(daemon.stdout.readline())
        dead = daemon.pid
        daemon.kill()
        daemon.wait(10)
        try:
            began = time.monotonic()
            if helper_lingers_s is None:
                with pytest.raises(daemon_lock.Held) as held:
                    daemon_lock.acquire(state, started_at="t1", shared=[shared])
                assert f"pid {dead}" in str(held.value)
                assert time.monotonic() - began >= 2.0
            else:
                lock = daemon_lock.acquire(state, started_at="t1", shared=[shared])
                lock.release()
                assert time.monotonic() - began < 2.0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)
