"""The observer side of the `intake` benchmark, run as its own process so that listing folders
of thousands of files does not share the daemon's CPU time, as a user's own watcher would not:
`python -m benchmarks.intake_watch N RESULTS DONE FAILED TIMEOUT_S`.

Waits for one line on stdin, the time.monotonic() (system-wide on Linux) at which the files
were dropped, then polls: results/ until it holds N `<id>.json` names (every task admitted or
refused), then done/ and failed/ until N task files are filed there (every task terminal).
Prints one JSON object: `admitted_s` and `terminal_s` after the drop (null when not reached
within TIMEOUT_S) and `progress`, a list of (seconds, results, filed) samples.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

POLL_S = 0.005  # the admission takes well under a second: a fine grain
POLL_DONE_S = 0.02


def _count(folder: str, suffix: str) -> int:
    try:
        return sum(1 for n in os.listdir(folder) if n.endswith(suffix) and not n.startswith("."))
    except FileNotFoundError:
        return 0


def watch(n: int, results: str, done: str, failed: str, timeout_s: float, t0: float) -> Any:
    admitted_s: float | None = None
    terminal_s: float | None = None
    progress: list[tuple[float, int, int]] = []
    while True:
        now = time.monotonic()
        if now - t0 > timeout_s:
            break
        # results/ holds 2n names (results and event logs): stop listing it once all are in
        written = n if admitted_s is not None else _count(results, ".json")
        filed = _count(done, ".task.json") + _count(failed, ".task.json")
        if not progress or progress[-1][1:] != (written, filed):
            progress.append((round(now - t0, 4), written, filed))
        if admitted_s is None and written >= n:
            admitted_s = now - t0
        if filed >= n:
            terminal_s = now - t0
            admitted_s = terminal_s if admitted_s is None else admitted_s
            break
        time.sleep(POLL_S if admitted_s is None else POLL_DONE_S)
    return {"admitted_s": admitted_s, "terminal_s": terminal_s, "progress": progress}


def main(argv: list[str]) -> int:
    n, results, done, failed, timeout_s = argv
    t0 = float(sys.stdin.readline())
    print(json.dumps(watch(int(n), results, done, failed, float(timeout_s), t0)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
