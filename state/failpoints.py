"""Failpoints: named places on both sides of every commit point, where a crash test makes the
daemon die or an I/O call fail (as etcd's gofail points do). Unset in normal use, where `hit`
returns after one truth test.

Every module that writes something a restart depends on calls `hit(name)` at its commit
points; `POINTS` lists them all with what is on disk when one fires (a test checks that the
list and the calls agree), so a harness can pick among them without a list of its own.

    ORCH_FAILPOINTS="NAME=ACTION[@WHEN][,NAME=ACTION[@WHEN]...]"

ACTION: `kill` (SIGKILL the process), `exit` (`os._exit(99)`), `enospc` / `eio` (raise
OSError ENOSPC / EIO there, as the write it stands for would). WHEN counts the hits of that
point in this process: absent, every hit; `@3` the third hit only; `@3-` the third and every
later one; `@2-4` the second to the fourth.

    ORCH_FAILPOINTS_RANDOM="SEED:PROBABILITY[:ACTION]"

fires ACTION (default kill) at any hit of any point with that probability, drawn from
`random.Random(SEED)`, so one seed replays the same choices for the same run of hits.

    ORCH_FAILPOINTS_TRACE=PATH

appends `hit NAME` the first time each point is hit and `fire NAME N ACTION` before one fires,
so a harness learns which points its workload reaches and where a process died.

Read at import (`configure` re-reads, for tests in one process). `state/` holds this module so
that the lowest room (atomic writes, the spool, event logs) can call it too.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
from dataclasses import dataclass

# Atomic writes (state.atomic.write_bytes) name what they write; each kind has three points:
# `<kind>_write` (nothing written yet; where a full disk fails the write), `before_<kind>_rename`
# (the temporary file complete, the old file still in place) and `after_<kind>_rename` (the
# new file in place, its folder not yet fsynced).
WRITE_KINDS = {
    "result": "results/<task_id>.json",
    "session": ".orch/sessions/<session_id>.json",
    "last_good": ".orch/last-good.yaml and its .json",
    "engine_record": ".orch/engines/<replica>.json",
    "error_record": "spool/failed/<name>.error.json",
    "status": ".orch/status.json",
    "file": "any other atomically replaced file",
}

POINTS: dict[str, str] = {
    "after_claim_link": "the task file linked into active/, its incoming/ name not yet removed",
    "after_claim": "the task file in active/, nothing written for it",
    "after_session_turn": "a session turn counted, the task's queued result not yet written",
    "frame_write": "an event frame about to be appended to results/<id>.events.jsonl",
    "after_started_frame": "the `started` frame written, the running result not yet",
    "after_started": "the `started` frame and the running result written",
    "after_token": "`token` frames written (every batch: the tokens one read brought)",
    "after_terminal_frame": "the terminal frame fsynced, the terminal result not yet written",
    "before_task_filed": "the terminal result written, the task file still in active/",
    "after_task_filed": "the task file moved to done/ or failed/",
    "after_cancel_ack": "a cancel of a live task acknowledged, its canceled result not yet",
    "before_quarantine_move": "a refused entry's error record and result written, not moved",
    "after_quarantine_move": "a refused entry moved to spool/failed/",
    "after_config_applied": "an orch.yaml edit applied and kept as last good, pools not changed",
    "after_engine_spawn": "an engine process started, its record not yet written",
    "after_engine_record": "an engine process started and recorded, not yet Ready",
    "after_engine_stop": "a retired engine stopped, its record not yet removed",
    "before_group_sync": "a group commit's temporary files written, none synced or renamed",
}
for _kind, _what in WRITE_KINDS.items():
    POINTS[f"{_kind}_write"] = f"{_what}: about to write its temporary file"
    POINTS[f"before_{_kind}_rename"] = f"{_what}: temporary file complete, not renamed"
    POINTS[f"after_{_kind}_rename"] = f"{_what}: renamed into place, folder not fsynced"

ACTIONS = ("kill", "exit", "enospc", "eio")
_WHEN = re.compile(r"^(\d+)(?:(-)(\d*))?$")


@dataclass(frozen=True)
class Rule:
    action: str
    first: int = 1
    last: int | None = None  # None: no end

    def fires(self, count: int) -> bool:
        return count >= self.first and (self.last is None or count <= self.last)


def parse(spec: str) -> dict[str, Rule]:
    """`NAME=ACTION[@WHEN],...` as rules by point name; raises ValueError naming the fault,
    since a misspelt point would otherwise never fire and a crash test would pass vacuously."""
    rules: dict[str, Rule] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        if not sep:
            raise ValueError(f"failpoint {item!r}: expected NAME=ACTION")
        if name not in POINTS:
            raise ValueError(f"failpoint {name!r} does not exist (see state/failpoints.py)")
        action, at, when = action.partition("@")
        if action not in ACTIONS:
            raise ValueError(f"failpoint {item!r}: action must be one of {', '.join(ACTIONS)}")
        if not at:
            rules[name] = Rule(action)
            continue
        match = _WHEN.match(when)
        if match is None:
            raise ValueError(f"failpoint {item!r}: @WHEN is N, N- or N-M")
        first, dash, end = int(match.group(1)), match.group(2), match.group(3)
        last = first if dash is None else (int(end) if end else None)
        rules[name] = Rule(action, first, last)
    return rules


@dataclass
class _Armed:
    rules: dict[str, Rule]
    chance: float = 0.0
    chance_action: str = "kill"
    rng: random.Random | None = None
    trace: str | None = None


_armed: _Armed | None = None
_counts: dict[str, int] = {}


def configure(spec: str = "", *, random_spec: str | None = None, trace: str | None = None) -> None:
    """Arm the failpoints (what the environment variables say at import); hit counts restart."""
    global _armed
    _counts.clear()
    rules = parse(spec)
    armed = _Armed(rules, trace=trace or None)
    if random_spec:
        seed, _, rest = random_spec.partition(":")
        chance, _, action = rest.partition(":")
        armed.rng, armed.chance = random.Random(int(seed)), float(chance or 0.01)
        armed.chance_action = action or "kill"
        if armed.chance_action not in ACTIONS:
            raise ValueError(f"ORCH_FAILPOINTS_RANDOM: action must be one of {', '.join(ACTIONS)}")
    _armed = armed if (rules or armed.rng or armed.trace) else None


def hit(name: str) -> None:
    """Pass the point `name`: nothing unless armed; then maybe die or raise OSError here."""
    armed = _armed
    if armed is None:
        return
    if name not in POINTS:  # a typo here would make a crash test pass without crashing
        raise KeyError(f"failpoint {name!r} is not listed in state/failpoints.POINTS")
    count = _counts.get(name, 0) + 1
    _counts[name] = count
    if count == 1 and armed.trace:
        _trace(armed.trace, f"hit {name}")
    rule = armed.rules.get(name)
    action = rule.action if rule is not None and rule.fires(count) else None
    if action is None and armed.rng is not None and armed.rng.random() < armed.chance:
        action = armed.chance_action
    if action is None:
        return
    if armed.trace:
        _trace(armed.trace, f"fire {name} {count} {action}")
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(99)
    code = errno.ENOSPC if action == "enospc" else errno.EIO
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})")


def _trace(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {line}\n".encode())
    finally:
        os.close(fd)


# what is wrong with the ORCH_FAILPOINTS* variables, None when nothing: `orchctl` refuses to
# run with it (one line, exit 2) rather than every import of this module failing
ENV_PROBLEM: str | None = None
try:
    configure(
        os.environ.get("ORCH_FAILPOINTS", ""),
        random_spec=os.environ.get("ORCH_FAILPOINTS_RANDOM"),
        trace=os.environ.get("ORCH_FAILPOINTS_TRACE"),
    )
except ValueError as _exc:
    ENV_PROBLEM = str(_exc)
