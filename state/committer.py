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
  closes), ignores the signals a terminal or a service manager sends the daemon to stop it
  (its own session; SIGINT, SIGTERM and SIGHUP ignored: the daemon drains, then closes the
  pipe), and it holds the daemon's folder locks while it lives, so a restarted daemon
  never runs its recovery while a commit of the old one is still renaming files;
- a failpoint hit in the helper is asked of the daemon (`failpoints.hit` there): the same
  counts, the same random draws, the same trace lines, and a `kill` kills the daemon, which
  takes the helper with it, as a kill in the commit thread did;
- a helper that dies on its own fails the group it held (every task of it goes to the
  recovery pass, as after a failed write) and the next group starts a new one.

Messages go over two pipes of their own, pickled, each with a 4-byte length: the helper says
("ready",) once started; the daemon sends ("commit", group fields, armed) and ("hit-reply",
error or None); the helper sends ("hit", point) while the daemon's failpoints are armed, and
("done", outcome, syncs). Anything unexpected (a helper that dies, says something else, or
cannot start) ends that helper: a group it held fails, and where none starts at all the
commits run in the daemon's thread, as without one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


READY_S = 10.0  # how long a new helper may take to say it is ready


@dataclass
class _Helper:
    process: subprocess.Popen[bytes]
    to_helper: int  # the daemon's ends of the two pipes
    from_helper: int
    ready: bool = False  # it has said so (read at its first commit, not at its start)

    def close_pipes(self) -> None:
        for fd in (self.to_helper, self.from_helper):
            with contextlib.suppress(OSError):
                os.close(fd)


class Committer:
    """The daemon's side: `commit(group)` has the helper commit it (one group at a time,
    from any thread); `close()` ends the helper. `keep_fds` (the daemon's folder locks)
    stay open in the helper while it lives."""

    def __init__(self, keep_fds: Sequence[int] = ()) -> None:
        self.keep_fds = tuple(keep_fds)
        self._helper: _Helper | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._failed = False  # a helper could not be started: none is tried again
        # told the number of fsync/syncfs calls each commit made (the intake benchmark)
        self.on_syncs: Callable[[int], None] | None = None

    @property
    def pid(self) -> int | None:
        return self._helper.process.pid if self._helper is not None else None

    def _start(self) -> _Helper:
        """A new helper, started (it says it is ready before its first commit: the daemon's
        start does not wait for its interpreter). Its own pipes carry the messages (its
        stdout and stderr are the daemon's, for anything it prints); its own session and
        ignored SIGINT/SIGTERM/SIGHUP keep a Ctrl-C or a service stop meant for the daemon
        from killing it mid-commit: it ends when the daemon closes its pipe, or dies."""
        env = {k: v for k, v in os.environ.items() if k not in _FAILPOINT_VARS}
        root = str(Path(__file__).resolve().parent.parent)  # the folder holding `state`
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        argv = [str(os.getpid()), str(down_r), str(up_w)]
        try:
            process = subprocess.Popen(
                # -P: never a module of the daemon's working folder in its place
                [sys.executable, "-P", "-m", "state.committer", *argv],
                stdin=subprocess.DEVNULL,
                pass_fds=(down_r, up_w, *self.keep_fds),
                env=env,
                close_fds=True,
                start_new_session=True,
            )
        except BaseException:
            for fd in (down_r, down_w, up_r, up_w):
                os.close(fd)
            raise
        os.close(down_r)
        os.close(up_w)
        return _Helper(process, down_w, up_r)

    def _await_ready(self, helper: _Helper) -> bool:
        """Whether `helper` says it is ready within READY_S; one that does not is ended,
        and no other is tried: the commits run in the caller's thread."""
        if helper.ready:
            return True
        said = select.select([helper.from_helper], [], [], READY_S)[0] and _receive(
            helper.from_helper
        )
        if said == ("ready",):
            helper.ready = True
            return True
        self._discard(helper)
        self._failed = True
        _log.warning("the commit helper did not start (said %r): committing in-process", said)
        return False

    def start(self) -> None:
        """Start the helper now (from the thread whose end it is to die with: the daemon's
        main thread), not at the first commit."""
        with self._lock:
            if self._helper is None and not self._closed:
                self._helper = self._spawned()

    def _spawned(self) -> _Helper | None:
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
            helper = self._helper
            if not self._closed and (helper is None or helper.process.poll() is not None):
                if helper is not None:  # died while idle: nothing of a group lost
                    self._discard(helper)
                helper = self._helper = self._spawned()
            if helper is not None and not self._await_ready(helper):
                helper = None
            if helper is None:  # closed (the daemon is stopping), or none could start
                atomic._commit(group)
                return
            group.committed = True
            outcome = self._exchange(helper, group)
        if outcome is not None:
            raise outcome

    def _exchange(self, helper: _Helper, group: atomic.Group) -> Exception | None:
        fields = {
            "ops": group.ops,
            "units": group.units,
            "written": group.written,
            "unwritten": group.unwritten,
            "appends": group.appends,
            "poisoned": {k: _error_fields(v) for k, v in group.poisoned.items()},
        }
        message = ("commit", fields, failpoints._armed is not None)
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)  # fails before a byte
        in_step = False
        try:
            atomic.write_all(helper.to_helper, _LENGTH.pack(len(body)) + body)
            while True:
                reply = _receive(helper.from_helper)
                if reply is None:
                    raise BrokenPipeError(errno.EPIPE, "the helper closed its pipe")
                if reply[0] != "hit":
                    break
                answer = None  # a failpoint of the commit, taken here (it may kill us)
                try:
                    failpoints.hit(reply[1])
                except Exception as exc:  # raised there, where the point is
                    answer = _error_fields(exc)
                _send(helper.to_helper, ("hit-reply", answer))
            in_step = True
        except OSError as exc:  # what it did of the group is unknown: the recovery pass
            died = HelperDied(errno.EIO, f"the commit helper died mid-commit ({exc})")
            return atomic.GroupFailed(dict.fromkeys(group.units, died))  # takes each task
        finally:
            if not in_step:  # dead, or out of step with us: never used again
                self._discard(helper)
        _, outcome, syncs = reply
        group.syncs += 2
        if self.on_syncs is not None:
            self.on_syncs(syncs)
        if outcome is None:
            return None
        if outcome[0] == "failed":
            failures = {key: _os_error(fields_of) for key, fields_of in outcome[1].items()}
            return atomic.GroupFailed(failures)
        return _error(outcome[1])

    def _discard(self, helper: _Helper) -> None:
        with contextlib.suppress(OSError):
            helper.process.kill()
        with contextlib.suppress(Exception):
            helper.process.wait(5)
        helper.close_pipes()
        if self._helper is helper:
            self._helper = None

    def close(self) -> None:
        """End the helper once its commit in hand is done; later commits run in the caller."""
        with self._lock:
            self._closed = True
            helper, self._helper = self._helper, None
        if helper is None:
            return
        with contextlib.suppress(OSError):
            os.close(helper.to_helper)  # the helper exits at the end of its input
        try:
            helper.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                helper.process.kill()
            helper.process.wait(5)
        with contextlib.suppress(OSError):
            os.close(helper.from_helper)


# -- the helper process ----------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """SIGKILL this process when the daemon goes (the thread that started it, in fact)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # gone before the line above
        os._exit(0)


def _serve(parent: int, from_daemon: int, to_daemon: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # meant for the daemon
        signal.signal(sig, signal.SIG_IGN)
    _die_with(parent)
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

    def ask(name: str) -> None:  # a failpoint: the daemon decides (and may die there)
        _send(to_daemon, ("hit", name))
        reply = _receive(from_daemon)
        if reply is None:
            os._exit(0)
        if reply[1] is not None:
            raise _error(reply[1])

    def quiet(name: str) -> None:
        return None

    _send(to_daemon, ("ready",))
    while True:
        message = _receive(from_daemon)
        if message is None:
            atomic.release_spares()
            return
        _, fields, armed = message
        failpoints.hit = ask if armed else quiet
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
    _serve(*(int(arg) for arg in sys.argv[1:4]))
