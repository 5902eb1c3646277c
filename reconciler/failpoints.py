"""Failpoints for crash tests: `ORCH_FAILPOINTS=after_claim=kill` makes the daemon SIGKILL
itself at that point, so a test can check recovery at every commit point.

Points: after_claim (task file in active/, nothing written), after_started_frame (the
`started` frame written, the running result not yet), after_started (the `started`
frame and running result written), after_token (first token frame written), after_cancel_ack
(a cancel request for a live task acknowledged, its canceled result not yet written),
after_session_turn (a session turn counted, the task's queued result not yet written).
Read once at import; unset in normal use, where `hit` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_POINTS = dict(
    item.split("=", 1) for item in os.environ.get("ORCH_FAILPOINTS", "").split(",") if "=" in item
)


def hit(name: str) -> None:
    action = _POINTS.get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(99)
