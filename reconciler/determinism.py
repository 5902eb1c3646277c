"""The determinism suite's pure core (HME-041, OC-TEST-7001..7003): the seed corpus, the
comparison of token streams, and latency statistics per device.

`cli_determinism` runs the corpus against a daemon and hands this module the `Stream`s it
read; `compare` decides, and `determinism_report` writes the verdict as the bundle's
determinism.md and determinism.json. `smoke_checks` runs a few seeds through the same code.
The rules it keeps:

- A stream is the sequence of token texts of a task's `token` frames plus its finish
  reason, as canonical JSON bytes: two streams match when those bytes are equal, and the
  first diverging token is the first index where the texts differ (or where one ends).
- The same replica, seed and prompt across two runs must give byte-identical streams: a
  difference fails the suite. Across replicas (other pools, other GPUs) streams of the same
  model are compared and counted, never failed: two GPU models may round differently.
- Determinism is not assumed across engine versions or model digests: lanes are compared
  only within one (model, engine_version, model_digest).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

FIRST_SEED = 1001  # seeds.txt of llama-orch holds 1001..1064 (OC-TEST-7003)
DEFAULT_SEEDS = 64
TEMPERATURE = 0.7  # above 0, so the seed picks the tokens
PROMPTS = (
    "Write one sentence about graphics cards.",
    "List three uses of a hash table.",
    "Explain what a mutex protects, briefly.",
    "Name a prime number larger than one hundred and say why it is prime.",
    "Describe the smell of rain in a few words.",
    "What does a compiler do? Answer in one line.",
    "Give a short tip for writing readable code.",
    "Summarise the water cycle for a child.",
)


def seeds(count: int) -> list[int]:
    return list(range(FIRST_SEED, FIRST_SEED + count))


def prompt_for(seed: int) -> str:
    return PROMPTS[(seed - FIRST_SEED) % len(PROMPTS)]


@dataclass(frozen=True)
class Stream:
    """One task of the suite as it was streamed and finished."""

    lane: str  # the pool the task was pinned to
    run: int  # 1 or 2
    seed: int
    task_id: str
    status: str  # the result's status
    tokens: tuple[str, ...] = ()
    finish_reason: str | None = None
    replica_id: str | None = None
    gpu: str | None = None  # "GPU 0 NVIDIA GeForce RTX 3090"
    model: str | None = None
    engine: str | None = None
    engine_version: str | None = None
    model_digest: str | None = None
    first_token_ms: float | None = None
    decode_ms: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "succeeded"

    def canonical(self) -> bytes:
        return json.dumps(
            {"tokens": list(self.tokens), "finish_reason": self.finish_reason},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode()

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: `decode_ms` runs from the first token to the last, so it spans the
        tokens after the first."""
        if not self.decode_ms or len(self.tokens) < 2:
            return None
        return (len(self.tokens) - 1) * 1000.0 / self.decode_ms


@dataclass(frozen=True)
class Divergence:
    seed: int
    index: int  # the first token that differs
    a: str | None  # None: that stream had ended
    b: str | None

    def describe(self) -> str:
        return f"seed {self.seed}, token {self.index}: {_shown(self.a)} vs {_shown(self.b)}"


@dataclass
class PairCount:
    """Streams of one kind of pair (a replica with itself, or lane A with lane B)."""

    a: str
    b: str
    gpus: tuple[str, str]
    matched: int = 0
    mismatched: int = 0
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def first(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None


@dataclass(frozen=True)
class Latency:
    device: str
    n: int
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    tps_p50: float | None
    tps_p95: float | None


@dataclass
class Verdict:
    same: list[PairCount]
    cross: list[PairCount]
    latency: list[Latency]
    failed: list[Stream]
    distinct_per_lane: dict[str, int]  # distinct streams across seeds, run 1
    problems: list[str]
    # the replicas and GPUs the suite could not run on (no Ready replica there, or no seed
    # landed there): named in the report, never counted as checked
    not_run: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def diverge(seed: int, a: Sequence[str], b: Sequence[str]) -> Divergence | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return Divergence(seed, i, x, y)
    if len(a) != len(b):
        i = min(len(a), len(b))
        return Divergence(seed, i, a[i] if i < len(a) else None, b[i] if i < len(b) else None)
    return None


def compare(streams: Iterable[Stream], *, runs: int = 2) -> Verdict:
    """Same-replica pairs (run 1 against each later run), cross-lane pairs (run 1, lanes of
    one model, engine version and digest), latency per device, and what fails the suite."""
    by_key: dict[tuple[str, int, int], Stream] = {}
    for s in streams:
        by_key[(s.lane, s.run, s.seed)] = s
    lanes = sorted({lane for lane, _, _ in by_key})
    seed_list = sorted({seed for _, _, seed in by_key})
    failed = [s for s in by_key.values() if not s.ok]
    problems = [f"{len(failed)} task(s) did not succeed"] if failed else []

    same: dict[tuple[str, str], PairCount] = {}
    moved: dict[tuple[str, str], PairCount] = {}  # one pool's two replicas, by one seed
    for lane in lanes:
        for seed in seed_list:
            first = by_key.get((lane, 1, seed))
            for run in range(2, runs + 1):
                later = by_key.get((lane, run, seed))
                if first is None or later is None or not (first.ok and later.ok):
                    continue
                if first.replica_id != later.replica_id:  # another replica of the pool
                    a, b = sorted((first.replica_id or lane, later.replica_id or lane))
                    pair = moved.setdefault(
                        (a, b), PairCount(a, b, (first.gpu or "?", later.gpu or "?"))
                    )
                    _count(pair, seed, first, later)
                    continue
                replica = first.replica_id or lane
                count = same.setdefault(
                    (lane, replica), PairCount(replica, replica, (first.gpu or "?",) * 2)
                )
                _count(count, seed, first, later)
    for count in same.values():
        if count.mismatched:
            problems.append(
                f"replica {count.a} gave different streams for the same seed in "
                f"{count.mismatched} of {count.matched + count.mismatched} pairs"
            )
    if not same and not failed and by_key:
        problems.append("no same-replica pair could be compared")

    cross: list[PairCount] = []
    for i, a in enumerate(lanes):
        for b in lanes[i + 1 :]:
            first_a = [by_key.get((a, 1, seed)) for seed in seed_list]
            first_b = [by_key.get((b, 1, seed)) for seed in seed_list]
            pairs = [(x, y) for x, y in zip(first_a, first_b, strict=True) if x and y]
            pairs = [(x, y) for x, y in pairs if x.ok and y.ok and _comparable(x, y)]
            if not pairs:
                continue
            count = PairCount(a, b, (pairs[0][0].gpu or "?", pairs[0][1].gpu or "?"))
            for x, y in pairs:
                _count(count, x.seed, x, y)
            cross.append(count)
    cross += sorted(moved.values(), key=lambda c: (c.a, c.b))

    distinct = {
        lane: len({s.canonical() for (ln, run, _), s in by_key.items() if ln == lane and run == 1})
        for lane in lanes
    }
    return Verdict(
        same=sorted(same.values(), key=lambda c: c.a),
        cross=cross,
        latency=latency(by_key.values()),
        failed=sorted(failed, key=lambda s: s.task_id),
        distinct_per_lane=distinct,
        problems=problems,
    )


def _comparable(x: Stream, y: Stream) -> bool:
    return (x.model, x.engine_version, x.model_digest) == (
        y.model,
        y.engine_version,
        y.model_digest,
    )


def _count(count: PairCount, seed: int, x: Stream, y: Stream) -> None:
    if x.canonical() == y.canonical():
        count.matched += 1
        return
    count.mismatched += 1
    found = diverge(seed, x.tokens, y.tokens)
    if found is None:  # same tokens, another finish reason
        found = Divergence(seed, len(x.tokens), x.finish_reason, y.finish_reason)
    count.divergences.append(found)


def latency(streams: Iterable[Stream]) -> list[Latency]:
    """Time to first token and tokens/s of the succeeded streams, p50 and p95, per device."""
    per: dict[str, list[Stream]] = {}
    for s in streams:
        if s.ok:
            per.setdefault(s.gpu or "an unknown GPU", []).append(s)
    rows = []
    for device, group in sorted(per.items()):
        ttft = [s.first_token_ms for s in group if s.first_token_ms is not None]
        tps = [t for s in group if (t := s.tokens_per_s) is not None]
        rows.append(
            Latency(
                device=device,
                n=len(group),
                ttft_p50_ms=percentile(ttft, 50),
                ttft_p95_ms=percentile(ttft, 95),
                tps_p50=percentile(tps, 50),
                tps_p95=percentile(tps, 95),
            )
        )
    return rows


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def _shown(token: str | None) -> str:
    return "(end)" if token is None else json.dumps(token, ensure_ascii=False)
