"""Supervision: the life of one replica's engine process, its restarts and its circuit breaker.

The reconcile loop keeps one `ReplicaLife` per replica and tells it what happened (`ready`,
`exited`, `drain`, …); the record answers what to do next (`restart_due`). Pure: the time is
passed in as `now` (monotonic seconds) and randomness comes from an injected `random`
callable, so tests run on a fake clock.

Policy (`RestartPolicy`, defaults from ARCHITECTURE §5):
- A replica that exits or fails to become Ready while Starting or Ready has *failed*. It waits
  1 s before its first restart, doubling each consecutive failure up to 60 s, each delay
  scaled by a random factor in [0.9, 1.1) so replicas that crashed together do not restart
  in lockstep.
- A *stable run* ends a failure streak: a replica that had been Ready for at least
  `stable_s` (60 s) before it exits starts again from 1 s, with an empty breaker.
- The circuit breaker opens when `breaker_failures` (5) failures of one streak fall within
  `breaker_window_s` (30 min, long enough for five load timeouts of 120 s plus backoff):
  the replica goes to Failed and is not restarted until `reset` (an operator action or a new
  spec that replaces it). `give_up` opens it at once for failures a restart cannot fix. The
  last `reasons_kept` failure reasons are kept for status.
- An exit while Draining is expected: the replica is Stopped, nothing is counted.

States: Starting → Ready; Starting or Ready → (exit) → BackingOff → (restart due) → Starting,
or → Failed when that exit opens the breaker; Starting/Ready → Draining → (exit) → Stopped;
Ready → Draining → (reclaim, its spec wanted again before its stop began) → Ready;
BackingOff/Failed → Stopped on drain; Failed → BackingOff on reset.
"""

from __future__ import annotations

import random as _random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from state import ids, statusfile

LifeState = statusfile.ReplicaState  # the one list of replica states


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_factor: float = 2.0
    jitter: float = 0.10  # ± fraction of the delay
    stable_s: float = 60.0  # Ready this long before an exit: the failure streak starts over
    breaker_failures: int = 5
    breaker_window_s: float = 1800.0
    reasons_kept: int = 10
    reason_max_chars: int = 500

    def backoff_s(self, failure: int, rnd: float) -> float:
        """Delay after the `failure`-th consecutive failure (1-based); `rnd` is in [0, 1)."""
        base = min(
            self.backoff_max_s, self.backoff_initial_s * self.backoff_factor ** (failure - 1)
        )
        return base * (1.0 + self.jitter * (2.0 * rnd - 1.0))


@dataclass(frozen=True)
class Failure:
    at: float
    reason: str


class InvalidTransition(Exception):
    """The daemon reported an event that cannot happen in the replica's state (a bug)."""


class ReplicaLife:
    """One replica's state machine. Created when its engine process is first spawned."""

    def __init__(
        self,
        replica_id: ids.ReplicaId,
        *,
        now: float,
        policy: RestartPolicy | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.replica_id = replica_id
        self.policy = policy or RestartPolicy()
        self._random = random
        self.state: LifeState = "Starting"
        self.started_at: float = now
        self.ready_at: float | None = None
        self.restarts = 0  # restarts after failures, over the replica's whole life
        self.streak = 0  # consecutive failures since the last stable run
        self.last_error: str | None = None
        self.next_restart_at: float | None = None
        self.failures: deque[Failure] = deque()  # this streak's failures inside the window
        self.reasons: deque[str] = deque(maxlen=self.policy.reasons_kept)
        self.drained_ready = False  # Draining: it was Ready when drained (it may serve again)

    # -- events -----------------------------------------------------------------------------

    def ready(self, now: float) -> None:
        """The engine answered its health check."""
        self._expect("ready", "Starting")
        self.state = "Ready"
        self.ready_at = now

    def exited(self, reason: str, now: float) -> LifeState:
        """The engine process ended (or was killed for not becoming Ready in time).

        Returns the new state: Stopped (it was draining), BackingOff or Failed.
        """
        if self.state == "Draining":
            self.state = "Stopped"
            return self.state
        self._expect("exited", "Starting", "Ready")
        if self.stable(now):
            self.streak = 0
            self.failures.clear()
        reason = _clean(reason, self.policy.reason_max_chars)
        self.streak += 1
        self.last_error = reason
        self.reasons.append(reason)
        self.failures.append(Failure(now, reason))
        while self.failures and self.failures[0].at < now - self.policy.breaker_window_s:
            self.failures.popleft()
        self.ready_at = None
        if len(self.failures) >= self.policy.breaker_failures:
            self.state = "Failed"
            self.next_restart_at = None
        else:
            self.state = "BackingOff"
            self.next_restart_at = now + self.policy.backoff_s(self.streak, self._random())
        return self.state

    def give_up(self, reason: str, now: float) -> None:
        """A failure restarting cannot fix (engine binary or driver missing): record it and
        open the breaker at once. The process, if any, must already be gone."""
        self._expect("give_up", "Starting", "Ready", "BackingOff")
        reason = _clean(reason, self.policy.reason_max_chars)
        self.streak += 1
        self.last_error = reason
        self.reasons.append(reason)
        self.failures.append(Failure(now, reason))
        self.ready_at = None
        self.state = "Failed"
        self.next_restart_at = None

    def restart_due(self, now: float) -> bool:
        return (
            self.state == "BackingOff"
            and self.next_restart_at is not None
            and now >= self.next_restart_at
        )

    def restarting(self, now: float) -> None:
        """The daemon spawns the engine again, once `restart_due(now)`."""
        self._expect("restarting", "BackingOff")
        if not self.restart_due(now):
            raise InvalidTransition(
                f"{self.replica_id}: restart at {now} is before {self.next_restart_at}"
            )
        self.state = "Starting"
        self.started_at = now
        self.next_restart_at = None
        self.restarts += 1

    def drain(self, now: float) -> LifeState:
        """Stop taking work and stop. With no process (BackingOff, Failed) it is Stopped at
        once; draining twice is harmless."""
        if self.state in ("Starting", "Ready"):
            self.drained_ready = self.state == "Ready"
            self.state = "Draining"
        elif self.state in ("BackingOff", "Failed"):
            self.state = "Stopped"
            self.next_restart_at = None
        return self.state

    def reclaim(self, now: float) -> None:
        """Serve again: a replica drained while Ready whose spec is wanted again before its
        process was stopped."""
        self._expect("reclaim", "Draining")
        if not self.drained_ready:
            raise InvalidTransition(f"{self.replica_id}: reclaim of a replica that was not Ready")
        self.state = "Ready"

    def reset(self, now: float) -> None:
        """Close the breaker (operator action): forget the streak and restart right away."""
        self._expect("reset", "Failed", "BackingOff")
        self.state = "BackingOff"
        self.streak = 0
        self.failures.clear()
        self.next_restart_at = now

    # -- questions --------------------------------------------------------------------------

    def stable(self, now: float) -> bool:
        """Ready for at least `stable_s`: the next failure will start a new streak."""
        return (
            self.state == "Ready"
            and self.ready_at is not None
            and now - self.ready_at >= self.policy.stable_s
        )

    def retry_in_s(self, now: float) -> float | None:
        if self.state != "BackingOff" or self.next_restart_at is None:
            return None
        return max(0.0, self.next_restart_at - now)

    def as_dict(self, now: float) -> dict[str, Any]:
        """For status.json and `orchctl status`."""
        return {
            "replica_id": self.replica_id,
            "state": self.state,
            "restarts": self.restarts,
            "consecutive_failures": self.streak,
            "breaker_open": self.state == "Failed",
            "retry_in_s": self.retry_in_s(now),
            "last_error": self.last_error,
            "recent_errors": list(self.reasons),
        }

    def _expect(self, event: str, *states: LifeState) -> None:
        if self.state not in states:
            raise InvalidTransition(
                f"{self.replica_id}: {event} while {self.state} (expected {' or '.join(states)})"
            )


def _clean(reason: str, limit: int) -> str:
    text = " ".join(reason.split()) or "exited (no reason given)"
    return text if len(text) <= limit else text[: limit - 1] + "…"
