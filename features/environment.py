"""Behave hooks: every scenario gets its own workstation folder; nothing is started globally.

A scenario's steps start the real daemon (`orchctl serve`) as a subprocess inside that
folder; `after_scenario` stops it the way an operator would (SIGINT), waits, kills it only if
it does not stop, and removes the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

STOP_WAIT_S = 20.0
KEEP_ENV = "ORCH_BDD_KEEP"  # set to keep the folders of failed scenarios for a post-mortem


def before_scenario(context: Any, scenario: Any) -> None:
    context.root = Path(tempfile.mkdtemp(prefix="orch-bdd-"))
    context.daemon = None


def after_scenario(context: Any, scenario: Any) -> None:
    root: Path = context.root
    daemon: subprocess.Popen[bytes] | None = context.daemon
    engine_pids = _engine_pids(root)
    if daemon is not None:
        _stop(daemon)
        context.daemon = None
    _kill_leftover_engines(engine_pids, root)
    failed = scenario.status.name == "failed"
    if failed:
        _print_tail(root / "daemon.log.jsonl", "daemon log")
        _print_tail(root / "daemon.out", "daemon stdout/stderr")
    if failed and os.environ.get(KEEP_ENV):
        print(f"kept {root} ({KEEP_ENV} is set)")
    else:
        shutil.rmtree(root, ignore_errors=True)


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        daemon.send_signal(signal.SIGINT)
    try:
        daemon.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            daemon.kill()
        daemon.wait(5)


def _engine_pids(root: Path) -> list[int]:
    """The pids of the engine replicas this scenario's daemon started (from its status)."""
    try:
        status = json.loads((root / ".orch" / "status.json").read_text())
    except (OSError, ValueError):
        return []
    return [
        replica["pid"]
        for pool in status.get("pools", [])
        for replica in pool.get("replicas", [])
        if isinstance(replica.get("pid"), int)
    ]


def _kill_leftover_engines(pids: list[int], root: Path) -> None:
    """A daemon that stopped cleanly stopped its engines; after a kill, end them by pid
    (only engines whose command line names this scenario's folder)."""
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # already gone
        if str(root).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _print_tail(path: Path, what: str, lines: int = 40) -> None:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return
    print(f"--- last {lines} lines of the {what} ({path.name}) ---")
    for line in text[-lines:]:
        print(line)
