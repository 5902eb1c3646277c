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

- like every helper of the daemon (state/helpers.py), it dies with the daemon
  (PR_SET_PDEATHSIG, and it exits once the daemon's end of its pipe
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

import errno
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

from state import atomic, failpoints, helpers


class HelperDied(OSError):
    """The helper ended in the middle of a commit: what it did of the group is unknown."""


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


class Committer(helpers.Owner):
    """The daemon's side: `commit(group)` has the helper commit it (one group at a time,
    from any thread); `close()` ends the helper. `keep_fds` (the daemon's folder locks)
    stay open in the helper while it lives."""

    module, what = "state.committer", "commit helper"

    def __init__(self, keep_fds: Sequence[int] = ()) -> None:
        super().__init__(keep_fds)
        # told the number of fsync/syncfs calls each commit made (the intake benchmark)
        self.on_syncs: Callable[[int], None] | None = None

    def start(self) -> None:
        """Start the helper now (from the thread whose end it is to die with: the daemon's
        main thread), not at the first commit."""
        self._start_one(wait=True)

    def commit(self, group: atomic.Group) -> None:
        if group.committed or not group.ops:
            return
        with self._lock:
            helper = self._helper
            if not self._closed and (helper is None or helper.process.poll() is not None):
                if helper is not None:  # died while idle: nothing of a group lost
                    self._discard(helper)
                helper = self._helper = self._spawned()
            if helper is not None and not self._ready(helper):
                helper = None
            if helper is None:  # closed (the daemon is stopping), or none could start
                atomic._commit(group)
                return
            group.committed = True
            outcome = self._exchange(helper, group)
        if outcome is not None:
            raise outcome

    def _exchange(self, helper: helpers.Helper, group: atomic.Group) -> Exception | None:
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
            helpers.send_body(helper.to_helper, body)
            while True:
                reply = helpers.receive(helper.from_helper)
                if reply is None:
                    raise BrokenPipeError(errno.EPIPE, "the helper closed its pipe")
                if reply[0] != "hit":
                    break
                answer = None  # a failpoint of the commit, taken here (it may kill us)
                try:
                    failpoints.hit(reply[1])
                except Exception as exc:  # raised there, where the point is
                    answer = _error_fields(exc)
                helpers.send(helper.to_helper, ("hit-reply", answer))
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


# -- the helper process ----------------------------------------------------------------------


def _serve(argv: Sequence[str]) -> None:
    from_daemon, to_daemon = helpers.serving(argv)
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
        helpers.send(to_daemon, ("hit", name))
        reply = helpers.receive(from_daemon)
        if reply is None:
            os._exit(0)
        if reply[1] is not None:
            raise _error(reply[1])

    def quiet(name: str) -> None:
        return None

    while True:
        message = helpers.receive(from_daemon)
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
        helpers.send(to_daemon, ("done", outcome, syncs))


if __name__ == "__main__":
    helpers.main(_serve)
