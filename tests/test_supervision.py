"""Supervision of one replica: backoff, the circuit breaker and the states, on a fake clock."""

from __future__ import annotations

import pytest

from reconciler import supervision
from reconciler.supervision import ReplicaLife, RestartPolicy
from state import ids

NO_BREAKER = RestartPolicy(breaker_failures=1000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def life(clock: FakeClock, policy: RestartPolicy | None = None, rnd: float = 0.5) -> ReplicaLife:
    return ReplicaLife(ids.ReplicaId("chat-0"), now=clock.now, policy=policy, random=lambda: rnd)


def crash_and_restart(replica: ReplicaLife, clock: FakeClock, reason: str = "exit code 1") -> float:
    """Crash now, wait out the backoff, restart; return the backoff that was chosen."""
    replica.exited(reason, clock.now)
    assert replica.next_restart_at is not None
    delay = replica.next_restart_at - clock.now
    clock.advance(delay)
    replica.restarting(clock.now)
    return delay


def test_a_new_replica_is_starting_then_ready() -> None:
    clock = FakeClock()
    replica = life(clock)
    assert replica.state == "Starting"

    replica.ready(clock.advance(2))

    assert (replica.state, replica.ready_at) == ("Ready", clock.now)


def test_a_crash_backs_off_one_second_then_doubles() -> None:
    clock = FakeClock()
    replica = life(clock, NO_BREAKER)

    delays = [crash_and_restart(replica, clock) for _ in range(5)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert replica.restarts == 5 and replica.state == "Starting"


def test_the_backoff_stops_growing_at_sixty_seconds() -> None:
    clock = FakeClock()
    replica = life(clock, NO_BREAKER)

    delays = [crash_and_restart(replica, clock) for _ in range(9)]

    assert delays[-3:] == [60.0, 60.0, 60.0]
    assert delays[5] == 32.0


@pytest.mark.parametrize(("rnd", "low", "high"), [(0.0, 0.9, 0.9), (0.999999, 1.0999, 1.1)])
def test_jitter_keeps_each_delay_within_ten_percent(rnd: float, low: float, high: float) -> None:
    clock = FakeClock()
    replica = life(clock, NO_BREAKER, rnd=rnd)

    delays = [crash_and_restart(replica, clock) for _ in range(8)]

    for delay, base in zip(delays, [1, 2, 4, 8, 16, 32, 60, 60], strict=True):
        assert base * low - 1e-9 <= delay <= base * high + 1e-9  # float clock


def test_a_restart_is_due_only_once_the_backoff_has_passed() -> None:
    clock = FakeClock()
    replica = life(clock)
    replica.exited("exit code 1", clock.now)

    assert replica.state == "BackingOff"
    assert not replica.restart_due(clock.advance(0.5))
    assert replica.retry_in_s(clock.now) == 0.5
    assert replica.restart_due(clock.advance(0.5))


def test_restarting_before_the_backoff_has_passed_is_refused() -> None:
    clock = FakeClock()
    replica = life(clock)
    replica.exited("exit code 1", clock.now)

    with pytest.raises(supervision.InvalidTransition, match="before"):
        replica.restarting(clock.advance(0.2))


def test_an_engine_that_never_gets_ready_counts_as_a_failure() -> None:
    clock = FakeClock()
    replica = life(clock)

    state = replica.exited("not ready after 120 s", clock.advance(120))

    assert state == "BackingOff" and replica.streak == 1
    assert replica.last_error == "not ready after 120 s"


def test_the_breaker_opens_after_five_failures_and_records_the_reasons() -> None:
    clock = FakeClock()
    replica = life(clock)
    reasons = [
        "exit code 1",
        "killed by SIGSEGV",
        "OOM: CUDA error: out of memory",
        "exit code 134",
        "CUDA error: an illegal memory access was encountered",
    ]
    for reason in reasons[:4]:
        replica.ready(clock.advance(3))
        crash_and_restart(replica, clock, reason)

    state = replica.exited(reasons[4], clock.advance(3))

    assert state == "Failed" and replica.state == "Failed"
    assert replica.next_restart_at is None and not replica.restart_due(clock.advance(3600))
    assert list(replica.reasons) == reasons
    assert replica.last_error == reasons[4]
    assert replica.as_dict(clock.now)["breaker_open"] is True


def test_giving_up_opens_the_breaker_at_once_for_what_a_restart_cannot_fix() -> None:
    clock = FakeClock()
    replica = life(clock)

    replica.give_up("engine binary llama-server not found", clock.now)

    assert replica.state == "Failed" and not replica.restart_due(clock.advance(3600))
    assert replica.last_error == "engine binary llama-server not found"
    assert list(replica.reasons) == ["engine binary llama-server not found"]


def test_failures_spread_beyond_the_window_do_not_open_the_breaker() -> None:
    clock = FakeClock()
    replica = life(clock, RestartPolicy(breaker_failures=3, breaker_window_s=100))
    crash_and_restart(replica, clock)
    crash_and_restart(replica, clock)
    clock.advance(200)  # a slow load, never Ready for long

    assert replica.exited("exit code 1", clock.now) == "BackingOff"
    assert len(replica.failures) == 1 and replica.streak == 3


def test_a_stable_run_resets_the_backoff_and_the_breaker() -> None:
    clock = FakeClock()
    replica = life(clock)
    for _ in range(4):
        crash_and_restart(replica, clock)
    replica.ready(clock.advance(1))
    assert replica.stable(clock.advance(60))

    replica.exited("exit code 1", clock.now)

    assert replica.state == "BackingOff" and replica.streak == 1
    assert replica.next_restart_at == clock.now + 1.0
    assert len(replica.failures) == 1


def test_a_run_shorter_than_a_minute_does_not_reset_the_backoff() -> None:
    clock = FakeClock()
    replica = life(clock, NO_BREAKER)
    for _ in range(3):
        crash_and_restart(replica, clock)
    replica.ready(clock.advance(1))
    assert not replica.stable(clock.advance(59))

    assert crash_and_restart(replica, clock) == 8.0


def test_an_exit_while_draining_stops_it_without_counting_a_failure() -> None:
    clock = FakeClock()
    replica = life(clock)
    replica.ready(clock.advance(1))

    assert replica.drain(clock.advance(1)) == "Draining"
    assert replica.drain(clock.now) == "Draining"  # asked twice: harmless
    assert replica.exited("killed by SIGTERM", clock.advance(1)) == "Stopped"
    assert replica.streak == 0 and replica.last_error is None


@pytest.mark.parametrize("opened", [False, True])
def test_draining_a_replica_without_a_process_stops_it_at_once(opened: bool) -> None:
    clock = FakeClock()
    replica = life(clock, RestartPolicy(breaker_failures=1) if opened else None)
    replica.exited("exit code 1", clock.now)

    assert replica.drain(clock.now) == "Stopped"
    assert not replica.restart_due(clock.advance(100))


def test_reset_closes_the_breaker_and_restarts_right_away() -> None:
    clock = FakeClock()
    replica = life(clock, RestartPolicy(breaker_failures=2))
    crash_and_restart(replica, clock)
    assert replica.exited("exit code 1", clock.now) == "Failed"

    replica.reset(clock.advance(5))

    assert replica.restart_due(clock.now)
    replica.restarting(clock.now)
    assert replica.exited("exit code 1", clock.now) == "BackingOff"  # a fresh streak
    assert replica.next_restart_at == clock.now + 1.0


def test_reasons_are_bounded_and_trimmed_to_one_line() -> None:
    clock = FakeClock()
    replica = life(clock, RestartPolicy(breaker_failures=100, reasons_kept=3, reason_max_chars=20))
    for n in range(5):
        crash_and_restart(replica, clock, f"exit code {n}")
    replica.exited("CUDA error:\n  out of memory allocating 2048 MiB", clock.now)

    assert list(replica.reasons) == ["exit code 3", "exit code 4", "CUDA error: out of …"]
    assert replica.last_error == "CUDA error: out of …" and len(replica.last_error) == 20


def test_events_that_cannot_happen_in_a_state_are_refused() -> None:
    clock = FakeClock()
    replica = life(clock)
    with pytest.raises(supervision.InvalidTransition, match="restarting while Starting"):
        replica.restarting(clock.now)
    replica.ready(clock.now)
    with pytest.raises(supervision.InvalidTransition, match="ready while Ready"):
        replica.ready(clock.now)
    replica.exited("exit code 1", clock.now)
    with pytest.raises(supervision.InvalidTransition, match="exited while BackingOff"):
        replica.exited("exit code 1", clock.now)


def test_the_status_record_says_what_an_operator_needs() -> None:
    clock = FakeClock()
    replica = life(clock)
    replica.exited("exit code 1", clock.now)

    assert replica.as_dict(clock.advance(0.25)) == {
        "replica_id": "chat-0",
        "state": "BackingOff",
        "restarts": 0,
        "consecutive_failures": 1,
        "breaker_open": False,
        "retry_in_s": 0.75,
        "last_error": "exit code 1",
        "recent_errors": ["exit code 1"],
    }


def test_a_replica_drained_while_ready_may_serve_again_one_drained_while_starting_not() -> None:
    clock = FakeClock()
    ready = life(clock)
    ready.ready(clock.advance(1))
    ready.drain(clock.advance(1))
    ready.reclaim(clock.advance(1))
    assert ready.state == "Ready"

    starting = life(clock)
    starting.drain(clock.now)
    with pytest.raises(supervision.InvalidTransition):
        starting.reclaim(clock.now)
    assert starting.state == "Draining"
    with pytest.raises(supervision.InvalidTransition):
        ready.reclaim(clock.now)  # not draining
