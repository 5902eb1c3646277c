"""The stop signals (SIGINT, SIGTERM, SIGHUP) received while `orchctl` still loads its modules,
kept for the verb to act on (`entry` installs `keep` before the heavy imports).

`serve` and `up` act on them as soon as their own handlers are in place (`take`); any other
verb gets the default disposition back and the signal delivered again (`release`), as if
nothing had caught it.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_pending: list[signal.Signals] = []
_installed = False


def keep(signum: int, frame: FrameType | None) -> None:
    _pending.append(signal.Signals(signum))


def install() -> None:
    """Keep the stop signals from now on, until `take` or `release`."""
    global _installed
    for sig in STOPS:
        signal.signal(sig, keep)
    _installed = True


def take() -> list[str]:
    """The names of the stop signals received before the caller's handlers were in place
    (the caller installs its own first); they are taken: a second call gives none."""
    names = [sig.name for sig in _pending]
    _pending.clear()
    return names


def release() -> None:
    """Give the stop signals their default handling back, and deliver again one received
    meanwhile (a verb that is not a daemon ends as it would have)."""
    global _installed
    if not _installed:
        return
    _installed = False
    for sig in STOPS:
        signal.signal(sig, signal.default_int_handler if sig is signal.SIGINT else signal.SIG_DFL)
    if _pending:
        os.kill(os.getpid(), _pending.pop(0))
