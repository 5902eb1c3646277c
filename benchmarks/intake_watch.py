"""The observer side of the `intake` benchmark, run as its own process so that its work does
not share the daemon's CPU time, as a user's own watcher would not:
`python -m benchmarks.intake_watch N RESULTS DONE FAILED TIMEOUT_S STAGED INCOMING`.

Watches results/, done/ and failed/ with inotify (as the daemon watches its spool), so it
neither lists folders of thousands of files nor holds their locks: a listing of results/
every 5 ms cost ~1.4 ms of CPU each once it held 2,000 names (a quarter of a core on a
2-core machine), and each took the folder's lock the daemon's own creations there wait for.
A name counts once it was created in or renamed into the folder: `<id>.json` in results/
(every task admitted or refused), `<name>.task.json` in done/ and failed/ (every task
terminal). Should the kernel's event queue overflow, that folder is counted by listing from
then on. The count it ends on is checked against one listing of each folder.

It is also the user's writer: on one line on stdin, it renames every `<name>.part` staged in
STAGED (spool/tmp) to INCOMING/<name>, in one tight loop, as a user's script would from its own
process. Dropped from the daemon's process, the renames held the daemon's loop thread for their
whole time (about 80 ms for 1,000 files, a tenth of the admission), which no user's writer does.
Then it reads events (at most every POLL_S) until N results, then N filed tasks. Prints one JSON
object: `t0` (the time.monotonic(), system-wide on Linux, before the first rename), `drop_ms`,
`admitted_s` and `terminal_s` after t0 (null when not reached within TIMEOUT_S) and
`progress`, a list of (seconds, results, filed) samples.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import sys
import time
from typing import Any

POLL_S = 0.002  # the admission takes about a second: a fine grain, and cheap with inotify

IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_Q_OVERFLOW = 0x4000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded


def _listed(folder: str, suffix: str) -> set[str]:
    try:
        return {n for n in os.listdir(folder) if n.endswith(suffix) and not n.startswith(".")}
    except FileNotFoundError:
        return set()


class Names:
    """The names ending in `suffix` that appeared in each of some folders, from inotify."""

    def __init__(self, folders: list[str], suffix: str) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.suffix = suffix
        self.seen: dict[int, set[str]] = {}
        self.folder: dict[int, str] = {}
        self.overflowed = False
        for folder in folders:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_MOVED_TO | IN_CREATE)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
            self.folder[wd] = folder
            self.seen[wd] = _listed(folder, suffix)  # (none, in the benchmark)

    def read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            at = 0
            while at < len(data):
                wd, mask, _, size = _HEADER.unpack_from(data, at)
                at += _HEADER.size
                name = data[at : at + size].rstrip(b"\0").decode(errors="replace")
                at += size
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                elif name.endswith(self.suffix) and not name.startswith("."):
                    self.seen[wd].add(name)

    def count(self) -> int:
        if self.overflowed:  # events were lost: the folders are what counts
            return sum(len(_listed(folder, self.suffix)) for folder in self.folder.values())
        return sum(len(names) for names in self.seen.values())

    def checked(self) -> int:
        """The count, or a listing's where that finds fewer (a name created, then gone)."""
        listed = sum(len(_listed(folder, self.suffix)) for folder in self.folder.values())
        return min(self.count(), listed)


def watch(n: int, results: Names, filed: Names, timeout_s: float, t0: float) -> dict[str, Any]:
    admitted_s: float | None = None
    terminal_s: float | None = None
    progress: list[tuple[float, int, int]] = []
    while True:
        now = time.monotonic()
        if now - t0 > timeout_s:
            break
        select.select([results.fd, filed.fd], [], [], POLL_S)
        now = time.monotonic()
        results.read()
        filed.read()
        written, done = results.count(), filed.count()
        if not progress or progress[-1][1:] != (written, done):
            progress.append((round(now - t0, 4), written, done))
        if admitted_s is None and written >= n and results.checked() >= n:
            admitted_s = now - t0
        if done >= n and filed.checked() >= n:
            terminal_s = now - t0
            admitted_s = terminal_s if admitted_s is None else admitted_s
            break
        time.sleep(POLL_S)
    return {"admitted_s": admitted_s, "terminal_s": terminal_s, "progress": progress}


def drop(staged: str, incoming: str) -> tuple[float, float]:
    """Renames every staged `<name>.part` into incoming/: (t0, milliseconds it took)."""
    moves = [
        (os.path.join(staged, name), os.path.join(incoming, name.removesuffix(".part")))
        for name in sorted(os.listdir(staged))
        if name.endswith(".part")
    ]
    t0 = time.monotonic()
    for part, target in moves:
        os.rename(part, target)
    return t0, (time.monotonic() - t0) * 1000


def main(argv: list[str]) -> int:
    n, results, done, failed, timeout_s, staged, incoming = argv
    watching = Names([results], ".json"), Names([done, failed], ".task.json")
    print("watching", flush=True)  # the benchmark asks for the drop once it reads this
    sys.stdin.readline()
    t0, drop_ms = drop(staged, incoming)
    seen = watch(int(n), *watching, float(timeout_s), t0)
    print(json.dumps({"t0": t0, "drop_ms": drop_ms, **seen}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
