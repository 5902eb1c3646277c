"""Timestamps as every frame and result carries them."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import example, given
from hypothesis import strategies as st

from reconciler import clocks


def _through_datetime(epoch: float) -> str:
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # to 2100
@example(1_795_000_000.9999996)  # rounds up into the next second
@example(1_795_000_000.0)
@example(1_795_000_000.0005)
@example(0.0)
def test_a_timestamp_is_what_datetime_writes(epoch: float) -> None:
    assert clocks.rfc3339(epoch) == _through_datetime(epoch)


def test_successive_calls_in_one_second_and_across_seconds_each_get_their_own_time() -> None:
    base = 1_795_000_000.0
    for epoch in (base + 0.25, base + 0.75, base + 1.001, base + 0.5, base + 86_400.999):
        assert clocks.rfc3339(epoch) == _through_datetime(epoch)
