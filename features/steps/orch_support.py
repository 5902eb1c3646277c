"""What the steps share: the scenario's folder, the daemon subprocess, polling, and reading
what a user reads (result files, event logs, spool folders, status.json, orchctl output).

Behave puts this folder on sys.path while it loads the step modules, so they import this one.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import parse
import yaml
from behave import register_type

from state import events, spool

TIMEOUT_S = 15.0  # generous for a loaded 2-core machine; a passing poll returns at once
POLL_S = 0.05
TERMINAL = ("succeeded", "failed", "canceled", "rejected")

INVENTORY = {
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 3090",
            "uuid": "GPU-bdd-0",
            "vram_total_mib": 24576,
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 3060",
            "uuid": "GPU-bdd-1",
            "vram_total_mib": 12288,
        },
    ]
}


# -- step parameter types: {x:Id} a task, pool, model or session id; {x:Code} an error code;
# {x:Status} a result status. Registered here, which every step module imports first.


@parse.with_pattern(r"[A-Za-z0-9._-]+")
def _parse_id(text: str) -> str:
    return text


@parse.with_pattern(r"[A-Z][A-Z_]+")
def _parse_code(text: str) -> str:
    return text


@parse.with_pattern(r"queued|running|succeeded|failed|canceled|rejected")
def _parse_status(text: str) -> str:
    return text


register_type(Id=_parse_id, Code=_parse_code, Status=_parse_status)


# -- files ----------------------------------------------------------------------------------


def config_path(context: Any) -> Path:
    path: Path = context.root / "orch.yaml"
    return path


def write_atomically(path: Path, text: str) -> None:
    """As an editor saving: the daemon never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def load_config(context: Any) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(config_path(context).read_text())
    return data


def save_config(context: Any, data: dict[str, Any]) -> None:
    write_atomically(config_path(context), yaml.safe_dump(data, sort_keys=False))


def the_spool(context: Any) -> spool.Spool:
    return spool.Spool(context.root / "spool")


def deliver(context: Any, name: str, text: str) -> Path:
    """Drop a task file into spool/incoming/ the safe way (write in tmp/, then link)."""
    return spool.deliver(the_spool(context).ensure(), text.encode(), name=name)


def task_text(task_id: str, **fields: Any) -> str:
    data: dict[str, Any] = {
        "task_id": task_id,
        "model": "m1",
        "prompt": "tell me about the weather",
        "max_tokens": 8,
    }
    data.update({k: v for k, v in fields.items() if v is not None})
    if fields.get("pool"):
        data.pop("model")  # a task names its model or its pool
    return yaml.safe_dump(data, sort_keys=False)


def result(context: Any, task_id: str) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(
            (context.root / "results" / f"{task_id}.json").read_text()
        )
    except (OSError, ValueError):
        return None  # not written yet (or being replaced: it is written atomically)
    return loaded


def frames(context: Any, task_id: str) -> list[events.EventFrame]:
    return list(events.read(context.root / "results" / f"{task_id}.events.jsonl"))


def status(context: Any) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads((context.root / ".orch" / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded


def pool_status(context: Any, pool_id: str) -> dict[str, Any] | None:
    data = status(context)
    if data is None:
        return None
    return next((p for p in data["pools"] if p["id"] == pool_id), None)


def pool_ready(pool: dict[str, Any] | None) -> bool:
    return (
        pool is not None
        and pool["state"] == "Ready"
        and not pool.get("reason")
        and len(pool["replicas"]) == pool.get("replicas_desired", len(pool["replicas"]))
        and all(r["state"] == "Ready" for r in pool["replicas"])
    )


def replica_pids(pool: dict[str, Any]) -> set[int]:
    return {r["pid"] for r in pool["replicas"] if r.get("pid") is not None}


# -- the daemon -----------------------------------------------------------------------------


def start_daemon(context: Any) -> None:
    root: Path = context.root
    out = (root / "daemon.out").open("wb")
    context.daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler.cli",
            "serve",
            "--config",
            str(config_path(context)),
            "--resync",
            "0.2",
            "--log-file",
            str(root / "daemon.log.jsonl"),
        ],
        cwd=root,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    out.close()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AUTH_TOKEN", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def daemon_gone(context: Any) -> str | None:
    """Why the daemon is not running, or None while it runs."""
    daemon = getattr(context, "daemon", None)
    if daemon is None or daemon.poll() is None:
        return None
    try:
        tail = (context.root / "daemon.out").read_text(errors="replace")[-2000:]
    except OSError:
        tail = ""
    return f"the daemon exited with {daemon.returncode}:\n{tail}"


def wait_for(
    context: Any,
    check: Callable[[], Any],
    what: str | Callable[[], str],
    timeout: float = TIMEOUT_S,
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`
    (a callable `what` is asked at failure time, to show the state that was last seen).

    Fails at once if the daemon died: no point waiting for a dead reconciler.
    """
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        gone = daemon_gone(context)
        if gone:
            raise AssertionError(f"while waiting for {_said(what)}: {gone}")
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {_said(what)}")
        time.sleep(POLL_S)


def _said(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


def wait_terminal(context: Any, task_id: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        found = result(context, task_id)
        return found if found and found["status"] in TERMINAL else None

    found: dict[str, Any] = wait_for(
        context, check, f"a terminal result for task {task_id!r}", timeout
    )
    return found


# -- orchctl --------------------------------------------------------------------------------


def orchctl(context: Any, args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `orchctl ARGS` in the scenario's folder, as a user in that folder would."""
    done = subprocess.run(
        [sys.executable, "-m", "reconciler.cli", *shlex.split(args)],
        cwd=context.root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )
    context.command = done
    context.command_line = f"orchctl {args}"
    return done


def describe_command(context: Any) -> str:
    done: subprocess.CompletedProcess[str] = context.command
    return (
        f"`{context.command_line}` exited {done.returncode}\n"
        f"--- stdout ---\n{done.stdout}\n--- stderr ---\n{done.stderr}"
    )
