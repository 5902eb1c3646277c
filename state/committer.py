"""The commit helper: a process of the daemon's own that carries out its group commits.

A group commit is many small system calls (create, write, close, rename, fsync). Made by a
thread of the daemon, each call returns into a wait for the interpreter lock while the event
loop runs Python: here, a file created and renamed by such a thread cost about three times
what it cost with the loop idle, and the disk sat waiting. The helper runs the very same
commit (`atomic._commit`) in its own interpreter, on another core, at the disk's pace; the
daemon's commit thread only hands a group over and reads its outcome (a few calls per group,
not four per file).

Nothing a commit guarantees changes: the helper does what the thread did, in the same order,
one group at a time. What it adds is kept from mattering:

- it dies with the daemon (PR_SET_PDEATHSIG, and it exits once the daemon's end of its pipe
  closes), and it holds the daemon's folder locks while it lives, so a restarted daemon
  never runs its recovery while a commit of the old one is still renaming files;
- a failpoint hit in the helper is asked of the daemon (`failpoints.hit` there): the same
  counts, the same random draws, the same trace lines, and a `kill` kills the daemon, which
  takes the helper with it, as a kill in the commit thread did;
- a helper that dies on its own fails the group it held (every task of it goes to the
  recovery pass, as after a failed write) and the next group starts a new one.

Messages are pickled, each with a 4-byte length: the daemon sends ("commit", group fields,
armed) and ("hit-reply", error or None); the helper sends ("hit", point) while the daemon's
failpoints are armed, and ("done", outcome, syncs).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from state import atomic, failpoints

_log = logging.getLogger("llama_orch.commit")
_LENGTH = struct.Struct("!I")
# what the helper must not inherit: it asks the daemon at each failpoint instead
_FAILPOINT_VARS = ("ORCH_FAILPOINTS", "ORCH_FAILPOINTS_RANDOM", "ORCH_FAILPOINTS_TRACE")


class HelperDied(OSError):
    """The helper ended in the middle of a commit: what it did of the group is unknown."""


def _send(fd: int, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    atomic.write_all(fd, _LENGTH.pack(len(body)) + body)


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts: list[bytes] = []
    while n:
        part = os.read(fd, n)
        if not part:
            return None
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _receive(fd: int) -> Any:
    """The next message, or None once the other end has closed."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _error_fields(exc: BaseException) -> tuple[Any, ...]:
    if isinstance(exc, OSError):
        return ("OSError", exc.errno, exc.strerror or str(exc), exc.filename, exc.filename2)
    return (type(exc).__name__, None, str(exc), None, None)


def _error(fields: Sequence[Any]) -> Exception:
    kind, code, message, filename, filename2 = fields
    if kind == "OSError":
        return OSError(code, message, filename, None, filename2)
    return RuntimeError(f"{kind}: {message}")


def _os_error(fields: Sequence[Any]) -> OSError:
    error = _error(fields)
    return error if isinstance(error, OSError) else OSError(errno.EIO, str(error))


class Committer:
    """The daemon's side: `commit(group)` has the helper commit it (one group at a time,
    from any thread); `close()` ends the helper. `keep_fds` (the daemon's folder locks)
    stay open in the helper while it lives."""

    def __init__(self, keep_fds: Sequence[int] = ()) -> None:
        self.keep_fds = tuple(keep_fds)
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._failed = False  # a helper could not be started: none is tried again
        # told the number of fsync/syncfs calls each commit made (the intake benchmark)
        self.on_syncs: Callable[[int], None] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k not in _FAILPOINT_VARS}
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding `state`
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        return subprocess.Popen(
            [sys.executable, "-m", "state.committer", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=self.keep_fds,
            env=env,
            close_fds=True,
        )

    def start(self) -> None:
        """Start the helper now (from the thread whose end it is to die with: the daemon's
        main thread), not at the first commit."""
        with self._lock:
            if self._process is None and not self._closed:
                self._process = self._spawned()

    def _spawned(self) -> subprocess.Popen[bytes] | None:
        """A new helper; None where none can be started (the commits then run in the
        caller's thread, as they did without one: slower, never wrong)."""
        if self._failed:
            return None
        try:
            return self._start()
        except (OSError, subprocess.SubprocessError) as exc:
            self._failed = True
            _log.warning("could not start the commit helper (%s): committing in-process", exc)
            return None

    def commit(self, group: atomic.Group) -> None:
        if group.committed or not group.ops:
            return
        with self._lock:
            process = self._process
            if not self._closed and (process is None or process.poll() is not None):
                process = self._process = self._spawned()
            if process is None:  # closed (the daemon is stopping), or none could start
                atomic._commit(group)
                return
            group.committed = True
            outcome = self._exchange(process, group)
        if outcome is not None:
            raise outcome

    def _exchange(self, process: subprocess.Popen[bytes], group: atomic.Group) -> Exception | None:
        assert process.stdin is not None and process.stdout is not None
        fields = {
            "ops": group.ops,
            "units": group.units,
            "written": group.written,
            "unwritten": group.unwritten,
            "appends": group.appends,
            "poisoned": {k: _error_fields(v) for k, v in group.poisoned.items()},
        }
        to_helper, from_helper = process.stdin.fileno(), process.stdout.fileno()
        try:
            _send(to_helper, ("commit", fields, failpoints._armed is not None))
            while True:
                message = _receive(from_helper)
                if message is None:
                    raise BrokenPipeError(errno.EPIPE, "the helper closed its pipe")
                if message[0] == "hit":  # a failpoint of the commit, taken here
                    reply = None
                    try:
                        failpoints.hit(message[1])
                    except OSError as exc:
                        reply = _error_fields(exc)
                    _send(to_helper, ("hit-reply", reply))
                    continue
                _, outcome, syncs = message
                break
        except OSError as exc:  # what it did of the group is unknown: the recovery pass
            self._discard(process)  # reads it from the disk for every task of the group
            died = HelperDied(errno.EIO, f"the commit helper died mid-commit ({exc})")
            return atomic.GroupFailed(dict.fromkeys(group.units, died))
        group.syncs += 2
        if self.on_syncs is not None:
            self.on_syncs(syncs)
        if outcome is None:
            return None
        if outcome[0] == "failed":
            failures = {key: _os_error(fields_of) for key, fields_of in outcome[1].items()}
            return atomic.GroupFailed(failures)
        return _error(outcome[1])

    def _discard(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            process.kill()
        with contextlib.suppress(Exception):
            process.wait(5)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._process = None

    def close(self) -> None:
        """End the helper once its commit in hand is done; later commits run in the caller."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None and process.stdout is not None
        with contextlib.suppress(OSError):
            process.stdin.close()  # the helper exits at the end of its input
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            self._discard(process)
        with contextlib.suppress(OSError):
            process.stdout.close()


# -- the helper process ----------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """SIGKILL this process when the daemon goes (the thread that started it, in fact)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # gone before the line above
        os._exit(0)


def _serve(parent: int) -> None:
    _die_with(parent)
    to_daemon, from_daemon = os.dup(1), 0
    os.dup2(2, 1)  # whatever prints goes to stderr, never into the pipe
    syncs = 0
    real_fsync, real_syncfs = os.fsync, atomic._syncfs

    def fsync(fd: Any) -> None:
        nonlocal syncs
        syncs += 1
        real_fsync(fd)

    def syncfs(fd: int) -> int:
        nonlocal syncs
        syncs += 1
        result: int = real_syncfs(fd)
        return result

    os.fsync = fsync
    if real_syncfs is not None:
        atomic._syncfs = syncfs

    def ask(point: str) -> None:  # a failpoint: the daemon decides (and may die there)
        _send(to_daemon, ("hit", point))
        reply = _receive(from_daemon)
        if reply is None:
            os._exit(0)
        if reply[1] is not None:
            raise _error(reply[1])

    def quiet(point: str) -> None:
        return None

    while True:
        message = _receive(from_daemon)
        if message is None:
            return
        _, fields, armed = message
        failpoints.hit = ask if armed else quiet  # type: ignore[assignment]
        group = atomic.Group(
            ops=fields["ops"],
            units=fields["units"],
            written=fields["written"],
            unwritten=fields["unwritten"],
            appends=fields["appends"],
            poisoned={k: _os_error(v) for k, v in fields["poisoned"].items()},
        )
        syncs = 0
        outcome: Any = None
        try:
            atomic._commit(group)
        except atomic.GroupFailed as failed:
            outcome = ("failed", {k: _error_fields(v) for k, v in failed.failures.items()})
        except Exception as exc:
            outcome = ("error", _error_fields(exc))
        _send(to_daemon, ("done", outcome, syncs))


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
