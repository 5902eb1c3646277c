"""The daemon's helper processes: work run in an interpreter of its own, on another core.

A thread of the daemon that runs Python (encoding JSON, hashing, building documents) holds
the interpreter lock the event loop needs, and every system call of the loop returns into a
wait for it. A helper process takes such work off the daemon's interpreter altogether. Two
use this module: the commit helper (state/committer.py) and the trace writer
(state/traces.py). What they share:

- messages go over two pipes of their own, pickled, each with a 4-byte length;
- the helper is started from the daemon's main thread and dies with it (PR_SET_PDEATHSIG,
  and it exits once the daemon's end of its pipe closes);
- it runs in its own session with SIGINT, SIGTERM and SIGHUP ignored: a Ctrl-C or a service
  stop meant for the daemon never kills it mid-work (the daemon drains, then closes the
  pipe);
- it never inherits the daemon's failpoints (`ORCH_FAILPOINTS*`): the commit helper asks the
  daemon at each point instead, and the trace writer has none;
- `-P`: never a module of the daemon's working folder in place of the helper's.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from state import atomic

_log = logging.getLogger("llama_orch.helpers")
_LENGTH = struct.Struct("!I")
# what a helper must not inherit: the commit helper asks the daemon at each failpoint instead
_FAILPOINT_VARS = ("ORCH_FAILPOINTS", "ORCH_FAILPOINTS_RANDOM", "ORCH_FAILPOINTS_TRACE")
READY_S = 10.0  # how long a new helper may take to say it is ready
RETRY_S = 60.0  # after a helper failed to start, how long the work stays in-process


def send(fd: int, message: Any, *, timeout_s: float | None = None) -> None:
    """Send `message`; with `timeout_s`, raise TimeoutError when the other end has not taken
    it all by then (stopped, hung: its pipe full)."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if timeout_s is None:
        send_body(fd, body)
        return
    data = memoryview(_LENGTH.pack(len(body)) + body)
    deadline = time.monotonic() + timeout_s
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    try:
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                raise TimeoutError(f"the helper took no message for {timeout_s:g} s")
            try:
                data = data[os.write(fd, data) :]
            except BlockingIOError:
                continue
    finally:
        os.set_blocking(fd, blocking)


def wait_readable(fd: int, timeout_s: float) -> None:
    """Return once `fd` has something to read (or its other end closed); raise TimeoutError
    after `timeout_s` (the helper stopped or hung mid-work)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout_s * 1000):
        raise TimeoutError(f"the helper did not answer within {timeout_s:g} s")


def send_body(fd: int, body: bytes) -> None:
    """Send a message already pickled (so that pickling fails before a byte is sent)."""
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


def receive(fd: int) -> Any:
    """The next message, or None once the other end has closed."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LENGTH.unpack(head)[0])
    return None if body is None else pickle.loads(body)


@dataclass
class Helper:
    """The daemon's side of one helper process."""

    process: subprocess.Popen[bytes]
    to_helper: int  # the daemon's ends of the two pipes
    from_helper: int
    ready: bool = False  # it has said so (read at its first use, not at its start)
    started_at: float = field(default_factory=time.monotonic)

    def close_pipes(self) -> None:
        for fd in (self.to_helper, self.from_helper):
            with contextlib.suppress(OSError):
                os.close(fd)

    def await_ready(self, timeout_s: float = READY_S) -> bool:
        """Whether it says ("ready",) within `timeout_s` (once; later calls answer at once)."""
        if not self.ready:
            poller = select.poll()  # not select.select: a descriptor may be 1024 or more
            poller.register(self.from_helper, select.POLLIN)
            said = poller.poll(timeout_s * 1000) and receive(self.from_helper)
            self.ready = said == ("ready",)
        return self.ready

    def kill(self) -> None:
        """End it now (dead, out of step, or never ready): whatever it held is lost."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.wait(5)
        self.close_pipes()

    def end(self, timeout_s: float = 10.0) -> None:
        """Close its input and wait for it to finish what it holds and exit; killed after
        `timeout_s`."""
        with contextlib.suppress(OSError):
            os.close(self.to_helper)  # the helper exits at the end of its input
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.process.kill()
            self.process.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.from_helper)


def spawn(module: str, keep_fds: Sequence[int] = ()) -> Helper:
    """Start `python -m <module> <daemon pid> <fd to read> <fd to write>`, without waiting
    for its interpreter. `keep_fds` (the daemon's folder locks) stay open in it while it
    lives. Raises OSError or SubprocessError where it cannot be started."""
    env = {k: v for k, v in os.environ.items() if k not in _FAILPOINT_VARS}
    root = str(Path(__file__).resolve().parent.parent)  # the folder holding `state`
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    argv = [str(os.getpid()), str(down_r), str(up_w)]
    try:
        process = subprocess.Popen(
            [sys.executable, "-P", "-m", module, *argv],
            stdin=subprocess.DEVNULL,
            pass_fds=(down_r, up_w, *keep_fds),
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
    return Helper(process, down_w, up_r)


class Owner:
    """The daemon's side of one kind of helper: the one running, if any. `_lock` guards
    it; where one cannot be started (or does not say it is ready in time), none is tried
    again for RETRY_S (the work runs in the caller's thread: slower, never wrong), so a
    passing cause (memory short for a moment, a machine too busy to start an interpreter in
    time) does not cost the daemon's whole life; once closed, none is started."""

    module = ""  # the helper's module, run as `python -m`
    what = ""  # what it is called in the log

    def __init__(self, keep_fds: Sequence[int] = ()) -> None:
        self.keep_fds = tuple(keep_fds)  # the daemon's folder locks: held while it lives
        self._helper: Helper | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._failed_at: float | None = None  # when one last failed to start

    @property
    def pid(self) -> int | None:
        helper = self._helper
        return helper.process.pid if helper is not None else None

    def _start_one(self, *, wait: bool) -> None:
        """A helper started where none runs (not waited for). `wait`: for the work in hand
        to release `_lock` first; else, when some is in hand, none is started now."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            if self._helper is None:
                self._helper = self._spawned()
        finally:
            self._lock.release()

    def _spawned(self) -> Helper | None:
        """A new helper (not waited for); None where none can be started."""
        failed_at = self._failed_at
        if self._closed or (failed_at is not None and time.monotonic() - failed_at < RETRY_S):
            return None
        try:
            return spawn(self.module, self.keep_fds)
        except (OSError, subprocess.SubprocessError) as exc:
            self._failed_at = time.monotonic()
            _log.warning("could not start the %s (%s): its work runs in-process", self.what, exc)
            return None

    def _ready(self, helper: Helper) -> bool:
        """Whether `helper` says it is ready. The first one is waited for, up to READY_S;
        one started again after a failure is not (its work runs in the caller until it is
        ready, so a cause that lasts never stalls the work READY_S at each retry), and fails
        too once READY_S have passed since its start. One that fails is ended, and none is
        tried for RETRY_S."""
        retried = self._failed_at is not None
        if helper.await_ready(0.0 if retried else READY_S):
            self._failed_at = None
            return True
        if retried and time.monotonic() - helper.started_at < READY_S:
            return False  # not ready yet: this time in the caller
        self._discard(helper)
        self._failed_at = time.monotonic()
        _log.warning("the %s did not start: its work runs in-process", self.what)
        return False

    def _discard(self, helper: Helper) -> None:
        helper.kill()
        if self._helper is helper:
            self._helper = None

    def close(self) -> None:
        """End the helper once the work in hand is done; later work runs in the caller."""
        with self._lock:
            self._closed = True
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.end()


def main(serve: Callable[[Sequence[str]], None]) -> None:
    """Run a helper's `serve(argv)`; a pipe to the daemon broken (the daemon died, maybe
    while this helper started) ends it quietly: nobody is left to tell, and a traceback
    would land among the daemon's log lines on the standard error they share."""
    try:
        serve(sys.argv[1:])
    except (BrokenPipeError, ConnectionResetError):
        os._exit(0)


def serving(argv: Sequence[str]) -> tuple[int, int]:
    """In the helper, first thing: ignore the signals meant for the daemon, die with it, and
    say ready. Returns (fd to read the daemon's messages from, fd to answer on)."""
    parent, from_daemon, to_daemon = (int(arg) for arg in argv[:3])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # meant for the daemon
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the daemon went before the line above
        os._exit(0)
    send(to_daemon, ("ready",))
    return from_daemon, to_daemon
