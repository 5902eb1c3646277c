"""Engine child processes: spawn in their own process group, tell pid reuse apart, stop, explain.

The engine adapters (`engine_llamacpp`, `engine_sim`) launch their servers through `launch` and
end them through `stop_replica`; the daemon uses `pid_alive` and `record` to find and adopt
engine processes after a restart. A replica's process group is its own session
(`start_new_session`), so a signal to the group reaches everything the engine started.

Pid reuse: a pid names a process only together with its start time (`plugins.liveness`, which
also counts a zombie as dead). Every signal to a process we did not spawn in this daemon is
sent only after checking both. `pid_alive` is liveness's, offered here too because the daemon
(`reconciler.pools`) and `plugins.llama_server` ask it of the engine processes this module runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import exit_reasons, interfaces, liveness

_log = logging.getLogger(__name__)

SCRUBBED_PREFIX = "LLAMA_ARG_"  # llama-server reads these as flags: they would override ours


def scrub_env(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` without `LLAMA_ARG_*` variables."""
    return {k: v for k, v in env.items() if not k.startswith(SCRUBBED_PREFIX)}


def log_path(spec: interfaces.ReplicaSpec) -> Path:
    """Where a replica's stdout and stderr go: `<state_dir>/engines/<replica_id>.log`."""
    return spec.state_dir / "engines" / f"{spec.replica_id}.log"


PORT_HELD_S = 60.0  # a port handed out is not handed out again for this long
_handed_out: dict[int, float] = {}  # port → when (monotonic)


def free_port() -> int:
    """A loopback port free right now (the child binds it a moment later), and not one
    handed out in the last PORT_HELD_S: the kernel may offer a port again as soon as the probe
    socket closes, and replicas started together would then race for it."""
    now = time.monotonic()
    for port, at in list(_handed_out.items()):
        if now - at > PORT_HELD_S:
            del _handed_out[port]
    port = 0
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            break
    _handed_out[port] = now
    return port


pid_alive = liveness.pid_alive


async def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path
) -> asyncio.subprocess.Process:
    """Start `argv` in a new session with stdout+stderr to `log_path` (the previous log is
    kept as `<name>.1`). Raises EngineStartError when the program cannot be executed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    with open(log_path, "wb") as log:
        log.write(f"# llama-orch: {shlex.join(argv)}\n".encode())
        log.flush()
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as e:
            raise interfaces.EngineStartError(f"cannot run {argv[0]}: {e}") from e


async def launch(
    spec: interfaces.ReplicaSpec, *, argv: Sequence[str], env: Mapping[str, str], port: int
) -> interfaces.ReplicaHandle:
    """Spawn a loopback HTTP engine for `spec` and return its handle (does not wait). The
    process carries a marker in its environment (`marked_env`), so a daemon that died before
    recording it can still find and stop it (`find_marked`)."""
    path = log_path(spec)
    process = await spawn(argv, env=marked_env(env, spec), log_path=path)
    started = liveness.start_time(process.pid)
    return interfaces.ReplicaHandle(
        spec=spec,
        pid=process.pid,
        port=port,
        started_at=started if started is not None else 0.0,
        log_path=path,
        process=process,
        base_url=f"http://127.0.0.1:{port}",
    )


MARK_STATE = "LLAMA_ORCH_STATE_DIR"
MARK_REPLICA = "LLAMA_ORCH_REPLICA"


def marked_env(env: Mapping[str, str], spec: interfaces.ReplicaSpec) -> dict[str, str]:
    """`env` plus the marker naming the daemon folder and replica the engine belongs to."""
    return {
        **env,
        MARK_STATE: str(Path(spec.state_dir).resolve()),
        MARK_REPLICA: spec.replica_id,
    }


def find_marked(state_dir: Path) -> dict[int, str]:
    """Live processes (pid → replica id) started for the daemon of `state_dir`, found by the
    marker in their environment. Processes of other users or folders are never returned."""
    want = f"{MARK_STATE}={Path(state_dir).resolve()}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if want in environ:
            pid = int(entry.name)
            replica = next(
                (
                    v.split(b"=", 1)[1]
                    for v in environ
                    if v.startswith(MARK_REPLICA.encode() + b"=")
                ),
                b"",
            )
            if liveness.running(pid):
                found[pid] = replica.decode(errors="replace")
    return found


def record(handle: interfaces.ReplicaHandle) -> dict[str, Any]:
    """What the daemon writes down to adopt the process after a restart."""
    return {
        "pid": handle.pid,
        "started_at": handle.started_at,
        "port": handle.port,
        "log_path": str(handle.log_path),
    }


def _log_tail(path: Path | None, *, max_bytes: int = 8192) -> list[str]:
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [
        line.strip()[:300]
        for line in text.splitlines()
        if line.strip() and not line.startswith("# llama-orch:")
    ]


def exit_info(
    returncode: int | None,
    log_path: Path | None,
    *,
    stopped: bool = False,
    engine: str = "llamacpp",
    model: str | None = None,
) -> interfaces.ExitInfo:
    """Why a process ended: its exit code or signal, classified with its log's tail
    (`plugins.exit_reasons`). `stopped`: we signalled it, so a SIGTERM is no crash."""
    return exit_reasons.classify(
        returncode,
        _log_tail(log_path),
        stopped=stopped,
        engine=engine,
        log_path=log_path,
        model=model,
    )


@dataclass(frozen=True)
class Stopped:
    returncode: int | None  # None for a process this daemon did not spawn (adopted)
    killed: bool  # it needed SIGKILL


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


async def _gone(pid: int, started_at: float, *, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while liveness.pid_alive(pid, started_at):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def stop(
    pid: int, *, started_at: float, process: asyncio.subprocess.Process | None, grace_s: float
) -> Stopped:
    """SIGTERM the process group, wait `grace_s`, SIGKILL the group, reap. Idempotent.

    With `process` (our child) the pid is ours until reaped; without it (adopted) every signal
    is sent only while `pid_alive(pid, started_at)`, so a reused pid is never touched. Either
    way, members of the group still there once the leader is gone (a helper that ignored the
    SIGTERM) are SIGKILLed: the kernel does not reuse a pid while a group of that id lives.
    """
    try:
        if process is not None:
            if process.returncode is not None:
                return Stopped(process.returncode, killed=False)
            _signal_group(pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                return Stopped(await asyncio.wait_for(process.wait(), grace_s), killed=False)
            _signal_group(pid, signal.SIGKILL)
            return Stopped(await process.wait(), killed=True)
        if not liveness.pid_alive(pid, started_at):
            return Stopped(None, killed=False)
        _signal_group(pid, signal.SIGTERM)
        if await _gone(pid, started_at, timeout_s=grace_s):
            return Stopped(None, killed=False)
        if liveness.pid_alive(pid, started_at):
            _signal_group(pid, signal.SIGKILL)
        await _gone(pid, started_at, timeout_s=10.0)
        return Stopped(None, killed=True)
    finally:
        await _kill_stragglers(pid)


def _group_members(pgid: int) -> list[int]:
    """Live processes (not zombies) whose process group is `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


async def _kill_stragglers(pgid: int, *, timeout_s: float = 5.0) -> None:
    """SIGKILL what is left of the group after its leader ended, and wait for it to go."""
    deadline = time.monotonic() + timeout_s
    while (members := _group_members(pgid)) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        await asyncio.sleep(0.02)
    if members:
        _log.warning("processes %s of group %s survived SIGKILL", members, pgid)


async def kill_group(pid: int, *, timeout_s: float = 5.0) -> None:
    """SIGKILL the process group led by `pid` and wait for the leader to die. The caller has
    checked `pid_alive(pid, started_at)` just before (see `stop` for the careful path)."""
    if pid <= 0:
        return
    _signal_group(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while liveness.running(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def poll_exit(handle: interfaces.ReplicaHandle) -> interfaces.ExitInfo | None:
    """Non-blocking: how the replica's process ended, or None while it runs."""
    if handle.process is not None:
        code = handle.process.returncode
        if code is None:
            return None
        return exit_info(
            code, handle.log_path, engine=handle.spec.engine, model=handle.spec.model_id
        )
    if liveness.pid_alive(handle.pid, handle.started_at):
        return None
    info = exit_info(None, handle.log_path, engine=handle.spec.engine, model=handle.spec.model_id)
    return dataclasses.replace(info, reason=f"{info.reason} (adopted process; it ended on its own)")


async def stop_replica(handle: interfaces.ReplicaHandle, *, grace_s: float) -> interfaces.ExitInfo:
    """Stop the replica's process group (see `stop`) and say how it ended."""
    stopped = await stop(
        handle.pid, started_at=handle.started_at, process=handle.process, grace_s=grace_s
    )
    if stopped.returncode is not None:
        return exit_info(stopped.returncode, handle.log_path, stopped=True)
    if stopped.killed:
        return interfaces.ExitInfo(None, int(signal.SIGKILL), "killed by SIGKILL (adopted process)")
    info = exit_info(None, handle.log_path, stopped=True)
    return dataclasses.replace(info, reason=f"stopped ({info.reason}; adopted process)")
