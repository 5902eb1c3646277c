"""Process liveness: running, the start time that tells pid reuse apart, zombies counted dead."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from plugins import liveness, processes


def test_a_zombie_child_counts_as_dead_in_every_liveness_check(zombie_pid: int) -> None:
    started = liveness.start_time(zombie_pid)
    assert started is not None  # the kernel still knows it, with its own start time
    os.kill(zombie_pid, 0)  # and signal 0 still reaches it: that is not the test of life

    assert not liveness.running(zombie_pid)
    assert not liveness.pid_alive(zombie_pid, started)
    assert not processes.pid_alive(zombie_pid, started)


def test_a_running_process_is_alive_only_with_its_own_start_time() -> None:
    pid = os.getpid()
    started = liveness.start_time(pid)
    assert started is not None

    assert liveness.running(pid)
    assert liveness.pid_alive(pid, started)
    assert not liveness.pid_alive(pid, started + 100)  # another process that got the same pid
    assert not liveness.pid_alive(pid, None)  # an unknown start time proves nothing


def test_a_reaped_child_and_impossible_pids_are_dead() -> None:
    finished = subprocess.Popen([sys.executable, "-S", "-c", ""])
    finished.wait()

    for pid in (finished.pid, 0, -1):
        assert liveness.start_time(pid) is None
        assert not liveness.running(pid)
        assert not liveness.pid_alive(pid, 0.0)


def test_ports_handed_out_together_are_all_different(monkeypatch: Any) -> None:
    """Replicas started together each get their own port, even when the kernel offers a
    port again the moment its probe socket closes."""
    offered = iter([41000, 41000, 41001, 41000, 41001, 41002])

    class Probe:
        def __enter__(self) -> Probe:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def bind(self, address: object) -> None:
            self.port = next(offered)

        def getsockname(self) -> tuple[str, int]:
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(processes, "_handed_out", {})
    monkeypatch.setattr(processes.socket, "socket", lambda *a: Probe())
    assert [processes.free_port() for _ in range(3)] == [41000, 41001, 41002]
