"""Estimates: service rates, predicted start, on-time probability, and their calibration.

Admission calls these for every accepted task (`queue_position` comes from the queue,
`predicted_start_ms` and `on_time_probability` from here) and the dispatcher refreshes them
for the `metrics` frames; a benchmark checks them with the calibration helpers. Everything is
pure: times are numbers passed in, in milliseconds relative to "now" unless a name says
otherwise. The formulas, which the docs quote:

Service rate, per replica (`observe`). A finished task that produced `tokens` tokens over
`decode_ms` (first token to last) gives a sample `x = tokens / decode_ms × 1000` tokens/s,
folded in with an exponentially weighted moving average, `alpha = 0.3` by default:

    mean' = mean + alpha × (x − mean)
    var'  = (1 − alpha) × (var + alpha × (x − mean)²)

`first_token_ms` and the fill ratio `tokens_out / max_tokens` are smoothed the same way;
a decode span under 1 ms gives no speed sample. Until a replica has a speed sample, the
caller passes a prior (`prior(...)`): the engine's configured speed where it has one (the sim
engine's `tokens_per_s` and `first_token_ms`), else `DEFAULT_TOKENS_PER_S` = 20 tokens/s and
`DEFAULT_FIRST_TOKEN_MS` = 500 ms, a modest consumer-GPU speed. While there is no speed
sample, each measurement replaces the prior rather than being averaged with it.

Service time of one task:

    service_ms          = first_token_ms + max_tokens / tokens_per_s × 1000
    expected_service_ms = first_token_ms + fill_ratio × max_tokens / tokens_per_s × 1000

`service_ms` is an upper bound: a task stops at a stop token or EOS long before `max_tokens`
more often than not, so it is pessimistic. `expected_service_ms` scales by the observed fill
ratio (1.0 until observed, so the two agree at first).

Predicted start (`predicted_start_ms`), list scheduling over the `c` slots that can serve the
task: a min-heap holds when each slot frees (0 for an idle slot, the remaining ms of its
running task otherwise); each task ahead, in dispatch order, takes the earliest-free slot
and holds it for its service time; the task starts when the earliest slot frees after that.
With no slot at all (no Ready replica), there is no prediction: None, written as `null`.

On-time probability (`on_time_probability`). The finish time is taken as normal with mean
`m = start + service` and standard deviation `sigma = cv × m + floor_ms` (`cv = 0.25`,
`floor_ms = 50`: the spread grows with the wait, and even an immediate task has some):

    P(finish ≤ deadline) = ½ × (1 + erf((deadline − m) / (sigma × √2)))

and 0 when the deadline has already passed. A task without a deadline, or without a
predicted start, has no probability: None, written as `null` in result files and metrics
frames (a CLI shows "-"), never a made-up 1.0.

Calibration (`Calibration.of`): mean absolute error of predicted vs actual start in ms, and
the Brier score `mean((p − outcome)²)` of on-time probabilities against whether the task met
its deadline (0 is perfect; always answering 0.5 scores 0.25).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_TOKENS_PER_S = 20.0
DEFAULT_FIRST_TOKEN_MS = 500.0
DEFAULT_ALPHA = 0.3
DEFAULT_CV = 0.25
DEFAULT_FLOOR_MS = 50.0
MIN_DECODE_MS = 1.0  # shorter decode spans are timer noise, not a speed


@dataclass(frozen=True)
class ServiceRate:
    """A replica's smoothed speed; `samples` counts speed samples (0: still the prior)."""

    tokens_per_s: float
    first_token_ms: float
    samples: int = 0
    tokens_per_s_var: float = 0.0
    fill_ratio: float = 1.0  # smoothed tokens_out / max_tokens

    def __post_init__(self) -> None:
        if not self.tokens_per_s > 0:
            raise ValueError(f"tokens_per_s must be positive, got {self.tokens_per_s}")
        if not self.first_token_ms >= 0:
            raise ValueError(f"first_token_ms must be non-negative, got {self.first_token_ms}")
        if not 0 <= self.fill_ratio <= 1:
            raise ValueError(f"fill_ratio must be within [0, 1], got {self.fill_ratio}")


def prior(
    tokens_per_s: float = DEFAULT_TOKENS_PER_S, first_token_ms: float = DEFAULT_FIRST_TOKEN_MS
) -> ServiceRate:
    """The rate assumed before a replica has finished a task (from engine options)."""
    return ServiceRate(tokens_per_s=tokens_per_s, first_token_ms=first_token_ms)


def observe(
    rate: ServiceRate | None,
    *,
    tokens: int,
    decode_ms: float,
    first_token_ms: float | None,
    max_tokens: int | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> ServiceRate:
    """Fold one finished task into `rate` (None: start from the default prior).

    Parts that were not measured are kept: no speed without a token over at least 1 ms of
    `decode_ms` (the timers tick in ms), no first-token time when it is None, no fill ratio
    without `max_tokens`. `samples` counts speed measurements; while it is 0 every measured
    part replaces the prior instead of being averaged with it.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be within (0, 1], got {alpha}")
    base = rate if rate is not None else prior()
    # A prior is a guess, not a measurement: the first sample replaces it.
    a = alpha if base.samples > 0 else 1.0

    tps, var, samples = base.tokens_per_s, base.tokens_per_s_var, base.samples
    if tokens > 0 and decode_ms >= MIN_DECODE_MS:
        x = tokens / decode_ms * 1000.0
        diff = x - tps
        tps = tps + a * diff
        var = (1 - a) * (var + a * diff * diff)
        samples += 1

    first = base.first_token_ms
    if first_token_ms is not None and first_token_ms >= 0:
        first = first + a * (first_token_ms - first)

    fill = base.fill_ratio
    if max_tokens is not None and max_tokens > 0:
        fill = fill + a * (min(tokens / max_tokens, 1.0) - fill)

    return ServiceRate(
        tokens_per_s=tps,
        first_token_ms=first,
        samples=samples,
        tokens_per_s_var=var,
        fill_ratio=min(max(fill, 0.0), 1.0),
    )


def service_ms(max_tokens: int, rate: ServiceRate) -> float:
    """Upper bound of one task's time on a slot: as if it produced all `max_tokens`."""
    return rate.first_token_ms + max_tokens / rate.tokens_per_s * 1000.0


def expected_service_ms(max_tokens: int, rate: ServiceRate) -> float:
    """One task's expected time on a slot, scaled by the replica's observed fill ratio."""
    return rate.first_token_ms + rate.fill_ratio * max_tokens / rate.tokens_per_s * 1000.0


def predicted_start_ms(slot_free_in_ms: Sequence[float], ahead: Sequence[float]) -> float | None:
    """When the task starts, by list scheduling of `ahead` (service times, in dispatch order)
    onto the slots; None when there is no slot to start on.

    A negative entry (a running task past its estimate) counts as a slot freeing now.
    """
    if not slot_free_in_ms:
        return None
    heap = [max(0.0, float(t)) for t in slot_free_in_ms]
    heapq.heapify(heap)
    for service in ahead:
        heapq.heappush(heap, heapq.heappop(heap) + max(0.0, float(service)))
    return heap[0]


def on_time_probability(
    predicted_start_ms: float | None,
    service_ms: float,
    deadline_in_ms: float | None,
    *,
    cv: float = DEFAULT_CV,
    floor_ms: float = DEFAULT_FLOOR_MS,
) -> float | None:
    """P(finish ≤ deadline) under the normal model above; None without a deadline or start."""
    if deadline_in_ms is None or predicted_start_ms is None:
        return None
    if deadline_in_ms <= 0:
        return 0.0
    mean = max(0.0, predicted_start_ms) + max(0.0, service_ms)
    sigma = cv * mean + floor_ms
    if sigma <= 0:  # only with cv and floor set to 0: a certain finish time
        return 1.0 if mean <= deadline_in_ms else 0.0
    return 0.5 * (1.0 + math.erf((deadline_in_ms - mean) / (sigma * math.sqrt(2.0))))


def mean_absolute_error(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Mean of |predicted − actual| over paired values."""
    if len(predicted) != len(actual):
        raise ValueError("predicted and actual must pair up")
    if not predicted:
        raise ValueError("no values to compare")
    return sum(abs(p - a) for p, a in zip(predicted, actual, strict=True)) / len(predicted)


def brier_score(probabilities: Sequence[float], outcomes: Sequence[bool]) -> float:
    """Mean of (p − outcome)² with outcome 1 for on time, 0 for late."""
    if len(probabilities) != len(outcomes):
        raise ValueError("probabilities and outcomes must pair up")
    if not probabilities:
        raise ValueError("no values to compare")
    pairs = zip(probabilities, outcomes, strict=True)
    return sum((p - float(o)) ** 2 for p, o in pairs) / len(probabilities)


@dataclass(frozen=True)
class Prediction:
    """One finished task in a benchmark: what was predicted at admission, what happened."""

    predicted_start_ms: float | None
    actual_start_ms: float
    on_time_probability: float | None = None
    on_time: bool | None = None  # None when the task had no deadline


@dataclass(frozen=True)
class Calibration:
    """How good the estimates were; a metric is None when no prediction could be scored."""

    start_samples: int
    start_mae_ms: float | None
    brier_samples: int
    brier: float | None

    @classmethod
    def of(cls, predictions: Iterable[Prediction]) -> Calibration:
        starts: list[tuple[float, float]] = []
        scores: list[tuple[float, bool]] = []
        for p in predictions:
            if p.predicted_start_ms is not None:
                starts.append((p.predicted_start_ms, p.actual_start_ms))
            if p.on_time_probability is not None and p.on_time is not None:
                scores.append((p.on_time_probability, p.on_time))
        return cls(
            start_samples=len(starts),
            start_mae_ms=(
                mean_absolute_error([p for p, _ in starts], [a for _, a in starts])
                if starts
                else None
            ),
            brier_samples=len(scores),
            brier=brier_score([p for p, _ in scores], [o for _, o in scores]) if scores else None,
        )


@dataclass(frozen=True)
class SlotSource:
    """One replica that could serve a task: when it can start work (0 when Ready, its
    expected startup otherwise), its slots, and the remaining ms of each task running on it."""

    start_in_ms: float
    slots: int
    busy_left_ms: tuple[float, ...] = ()


def slot_free_times(sources: Iterable[SlotSource]) -> list[float]:
    """When each slot of `sources` frees, in ms from now: the input of `predicted_start_ms`."""
    frees: list[float] = []
    for source in sources:
        lefts = sorted(source.busy_left_ms)
        for slot in range(source.slots):
            frees.append(source.start_in_ms + (lefts[slot] if slot < len(lefts) else 0.0))
    return frees


def remaining_ms(service_ms: float, elapsed_ms: float) -> float:
    """What is left of a running task's estimated service time (never negative)."""
    return max(0.0, service_ms - elapsed_ms)
