"""Clocks, injected everywhere time matters so tests of backoff, TTL and deadlines use a fake."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch (persisted timestamps, session TTL)."""
        ...

    def monotonic(self) -> float:
        """Seconds for durations and deadlines inside one daemon run."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """Time moves only when a test calls `advance`; `sleep` advances it and yields once."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._mono = 1000.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)


def rfc3339(epoch: float) -> str:
    """`epoch` as `2026-11-27T19:25:23.042Z` (UTC, milliseconds, as datetime's isoformat
    gives it). Every frame and result carries some: the date and time of the last second
    are kept, since formatting them through datetime was 2 % of the loop under a burst."""
    whole = math.floor(epoch)
    micros = round((epoch - whole) * 1_000_000)  # as datetime rounds: half to even
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return f"{_second_text(whole)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=2)
def _second_text(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
