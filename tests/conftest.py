"""Shared fixtures: a simulated workstation on disk, a daemon running in-process, and a zombie
process (exited, not reaped) for the liveness checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins import liveness
from reconciler import daemon as daemons
from state import events, results, spool

INVENTORY = {
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 3090",
            "uuid": "GPU-test-0",
            "vram_total_mib": 24576,
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 3060",
            "uuid": "GPU-test-1",
            "vram_total_mib": 12288,
        },
    ]
}


def config(**overrides: Any) -> dict[str, Any]:
    """A small desired state on the simulated 24 GB + 12 GB pair, with one fast sim pool."""
    base: dict[str, Any] = {
        "version": 1,
        "server": {"bind": "127.0.0.1:0"},  # any free port: tests run daemons side by side
        "gpus": {"observer": "simulated", "inventory": "inventory.yaml", "reserve_mib": 512},
        "queue": {"capacity": 16, "full_policy": "reject"},
        "timeouts": {"ready_s": 10, "drain_s": 5, "stop_grace_s": 2},
        "models": {
            "m1": {"ref": "file:m1.gguf", "size_mib": 1000},
            "old": {"ref": "file:old.gguf", "size_mib": 1000, "state": "Retired"},
        },
        "pools": [
            {
                "id": "p1",
                "engine": "sim",
                "model": "m1",
                "replicas": 1,
                "ctx": 2048,
                "slots": 2,
                "sim": {"tokens_per_s": 400, "load_s": 0.0},
            }
        ],
    }
    base.update(overrides)
    return base


@dataclass
class Workspace:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "orch.yaml"

    @property
    def spool(self) -> spool.Spool:
        return spool.Spool(self.root / "spool").ensure()

    @property
    def results(self) -> results.ResultStore:
        return results.ResultStore(self.root / "results")

    def write_config(self, data: dict[str, Any]) -> None:
        text = yaml.safe_dump(data, sort_keys=False)
        tmp = self.root / ".orch.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(self.config_path)

    def submit(self, name: str, data: dict[str, Any] | str | bytes) -> Path:
        if isinstance(data, dict):
            raw = yaml.safe_dump(data).encode()
        elif isinstance(data, str):
            raw = data.encode()
        else:
            raw = data
        return spool.deliver(self.spool, raw, name=name)

    def result(self, task_id: str) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(
                (self.root / "results" / f"{task_id}.json").read_text()
            )
            return loaded
        except (OSError, ValueError):
            return None

    def frames(self, task_id: str) -> list[events.EventFrame]:
        return list(events.read(self.root / "results" / f"{task_id}.events.jsonl"))

    def status(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.root / ".orch" / "status.json").read_text())
        return loaded


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    ws = Workspace(tmp_path)
    (tmp_path / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
    ws.write_config(config())
    return ws


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = check()
        except (OSError, ValueError, KeyError, IndexError, StopIteration):
            value = None  # status.json not written yet, or the thing not there yet
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def terminal(ws: Workspace, task_id: str) -> dict[str, Any] | None:
    r = ws.result(task_id)
    return r if r and r["status"] in results.TERMINAL else None


async def wait_terminal(ws: Workspace, task_id: str, timeout: float = 10.0) -> dict[str, Any]:
    found: dict[str, Any] = await wait_for(
        lambda: terminal(ws, task_id), timeout, f"a terminal result for {task_id}"
    )
    return found


@dataclass
class Running:
    daemon: daemons.Daemon
    job: asyncio.Task[int]

    async def stop(self) -> int:
        self.daemon.stop()
        return await asyncio.wait_for(self.job, 20)


@pytest.fixture
async def serve(workspace: Workspace) -> AsyncIterator[Callable[..., Any]]:
    started: list[Running] = []

    async def start(*, ready: bool = True, **options: Any) -> Running:
        opts = daemons.Options(
            config_path=workspace.config_path, resync_s=options.pop("resync_s", 0.5), **options
        )
        d = daemons.build(opts)
        job = asyncio.get_running_loop().create_task(d.run())
        running = Running(d, job)
        started.append(running)
        if ready:
            await wait_for(lambda: _all_ready(workspace) or job.done(), 15, "pools Ready")
            if job.done():
                job.result()
        return running

    yield start
    for running in started:
        if not running.job.done():
            await running.stop()


def _all_ready(ws: Workspace) -> bool:
    try:
        data = ws.status()
    except (OSError, ValueError):
        return False
    return all(p["state"] == "Ready" and not p.get("reason") for p in data["pools"])


def task(task_id: str, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": task_id,
        "model": "m1",
        "prompt": "hello there",
        "max_tokens": 8,
    }
    data.update(fields)
    return data


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


@pytest.fixture
def zombie_pid() -> Iterator[int]:
    """The pid of a child that has exited and that nobody has reaped yet (state Z in /proc):
    the kernel keeps its pid and start time, `kill(pid, 0)` still succeeds, yet it runs nothing
    and holds no memory. Reaped after the test."""
    child = subprocess.Popen([sys.executable, "-S", "-c", ""])
    try:
        deadline = time.monotonic() + 10
        while _proc_state(child.pid) != "Z":
            assert time.monotonic() < deadline, f"child {child.pid} did not become a zombie"
            time.sleep(0.01)
        yield child.pid
    finally:
        child.wait()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The hostile-input suite's one summary line (inputs tried, crashes, unclear errors)."""
    from tests import hostile

    if hostile.TALLY.tried:
        terminalreporter.write_line(hostile.TALLY.line())


@pytest.fixture(params=["cannot be started", "never says it is ready"])
def helpers_cannot_start(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> str:
    """A helper process (state/helpers.py) started now cannot start, or starts and exits
    without a word; the value says which."""
    if request.param == "cannot be started":
        monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    else:
        monkeypatch.setattr(sys, "executable", "/bin/true")  # starts, exits at once
    return str(request.param)


def assert_helper_dies_with_daemon(start: str) -> None:
    """Run a stand-in daemon whose `start` lines (Python, run with the project on the path)
    leave a helper process (state/helpers.py) serving in `h`; with another process holding
    the helper's pipe open (as a message in flight would), SIGKILL the daemon: the helper
    must die too, by its death signal alone."""
    script = (
        "import subprocess, time\n"
        + textwrap.dedent(start)
        + "\nassert h.await_ready()\n"
        + 'holder = subprocess.Popen(["sleep", "60"], pass_fds=[h.to_helper])\n'
        + "print(h.process.pid, holder.pid, flush=True)\n"
        + "time.sleep(60)\n"
    )
    root = Path(__file__).resolve().parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=root, text=True
    ) as daemon:
        assert daemon.stdout is not None
        pid, holder = (int(n) for n in daemon.stdout.readline().split())
        try:
            assert liveness.running(pid)
            daemon.kill()
            daemon.wait(10)
            deadline = time.monotonic() + 5
            while liveness.running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not liveness.running(pid)
        finally:
            os.kill(holder, signal.SIGKILL)


def full_disk_under(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of a file under `folder` fails, in this process, as on a full disk (the data
    did not fit); every other fsync is real."""
    real = os.fsync

    def fsync(fd: Any) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
