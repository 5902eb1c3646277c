"""What the loop has learned about each pool's speed: one object the dispatcher owns.

The dispatcher asks `predict` for a queued task's start and on-time probability and calls
`observe` when a task ends; the pool runtime calls `started` when a replica becomes Ready.
Priors come from the
applied config (the sim engine's configured speed and load time), so estimates are sensible
before the first task; each measurement then goes through `estimates.observe`. No I/O.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from reconciler import estimates, placement, queues
from state import desired

DEFAULT_STARTUP_MS = 5000.0  # replica start to Ready, before one was measured
DEFAULT_PRIOR = estimates.prior()


@dataclass
class Rates:
    measured: dict[str, estimates.ServiceRate] = field(default_factory=dict)
    startups: dict[str, float] = field(default_factory=dict)
    _priors: dict[str, estimates.ServiceRate] = field(default_factory=dict)
    _startup_priors: dict[str, float] = field(default_factory=dict)
    _specs: dict[str, str] = field(default_factory=dict)  # what each pool's measurements are of
    # per pool, bumped when its replicas change kind: a task that began before reports on
    # the old kind, which must not put the old speed back
    generations: dict[str, int] = field(default_factory=dict)

    def configure(self, state: desired.DesiredState | None) -> None:
        """Take the priors of a newly applied config. Measurements are kept for the pools
        whose replicas stay as they were (more replicas of one kind run at its speed); a
        pool whose engine, model, settings or devices changed starts again from its prior
        (an old speed kept, a pool made slower was promised starts, and retries after a
        429, far too soon)."""
        specs = (
            {
                pool.id: repr((pool.model_dump(exclude={"replicas"}), state.models.get(pool.model)))
                for pool in state.pools
            }
            if state is not None
            else {}
        )
        for pool_id, spec in self._specs.items():
            if specs.get(pool_id) != spec:
                self.measured.pop(pool_id, None)
                self.startups.pop(pool_id, None)
                self.generations[pool_id] = self.generations.get(pool_id, 0) + 1
        self._specs = specs
        self._priors, self._startup_priors = {}, {}
        for pool in state.pools if state else ():
            if pool.sim is not None:
                self._priors[pool.id] = estimates.prior(
                    pool.sim.tokens_per_s, pool.sim.first_token_ms + 1.0
                )
                self._startup_priors[pool.id] = pool.sim.load_s * 1000 + 200

    def rate(self, pool_id: str | None) -> estimates.ServiceRate:
        if pool_id is None:
            return DEFAULT_PRIOR
        return self.measured.get(pool_id) or self._priors.get(pool_id) or DEFAULT_PRIOR

    def generation(self, pool_id: str) -> int:
        return self.generations.get(pool_id, 0)

    def observe(
        self,
        pool_id: str,
        *,
        tokens: int,
        decode_ms: float,
        first_token_ms: float,
        generation: int | None = None,
    ) -> None:
        """Fold in a finished task: `decode_ms` runs from its first token to its end, so it
        spans the `tokens - 1` tokens after the first (counting all of them read 2 tokens in
        100 ms as 20 tokens/s, not 10: estimates too early by up to half). `generation`: the
        pool's when the task began; one of an older kind of replica tells nothing of now."""
        if generation is not None and generation != self.generation(pool_id):
            return
        if tokens > 0:
            self.measured[pool_id] = estimates.observe(
                self.rate(pool_id),
                tokens=tokens - 1,
                decode_ms=max(decode_ms, 1.0),
                first_token_ms=first_token_ms,
            )

    def started(self, pool_id: str, ready_ms: float) -> None:
        self.startups[pool_id] = ready_ms

    def startup_ms(self, pool_id: str) -> float:
        return self.startups.get(pool_id) or self._startup_priors.get(pool_id, DEFAULT_STARTUP_MS)

    def service_ms(self, pool_id: str | None, max_tokens: int) -> float:
        return estimates.service_ms(max_tokens, self.rate(pool_id))

    def predict(
        self,
        entry: queues.Entry,
        ahead: Iterable[queues.Entry],
        *,
        candidates: Iterable[placement.Candidate],
        busy: Iterable[tuple[str, float, float]],
        deadline_in_ms: float | None,
    ) -> tuple[float | None, float | None]:
        """Predicted start (ms from now) and on-time probability of `entry` with `ahead`
        queued before it, over the replicas that could serve it. `busy` holds, per running
        task, (replica id, estimated service ms, elapsed ms). Without a replica to estimate
        from, both are None: unknown, which is not "late"."""
        found = self.predict_queued(
            [entry],
            [*ahead, entry],
            candidates=candidates,
            busy=busy,
            deadline_in_ms=lambda _: deadline_in_ms,
        )[entry.task_id]
        return found.start_ms, found.on_time_probability

    def predict_queued(
        self,
        wanted: Iterable[queues.Entry],
        order: Sequence[queues.Entry],
        *,
        candidates: Iterable[placement.Candidate],
        busy: Iterable[tuple[str, float, float]],
        deadline_in_ms: Callable[[queues.Entry], float | None],
    ) -> dict[str, Estimate]:
        """`predict` for every entry of `wanted`, each behind what precedes it in `order`
        (the whole queue in dispatch order, `wanted` among it): one pass over the queue per
        (model, pinned pool), so estimating a burst costs O(queue), not O(queue) per task.

        List scheduling per replica: each task ahead takes the slot that frees first among
        the replicas *it* may run on (its pins, pool, context and the pool's max_tokens, as
        placement would allow), for its service time on that pool; a task's start is the
        first slot that frees among the replicas it may run on. A task pinned to a busy pool
        thus never holds an idle replica of another pool in the estimate."""
        candidates, lefts = list(candidates), _lefts(busy)
        groups: dict[Hashable, dict[str, queues.Entry]] = {}
        for entry in wanted:
            groups.setdefault(entry.route_key, {})[entry.task_id] = entry
        out: dict[str, Estimate] = {}
        for members in groups.values():
            first = next(iter(members.values()))
            serving = [c for c in candidates if c.model_id == first.model_id]
            heaps = self._slot_heaps(serving, lefts)
            pools: dict[str, str] = {c.replica_id: c.pool_id for c in serving}
            mine: list[str] = [
                c.replica_id for c in _allowed(first, serving) if heaps[c.replica_id]
            ]
            rate = self.rate(first.pool_id or (pools[mine[0]] if mine else None))
            guessed = {  # replicas whose start is a prior's guess: never started on this spec
                c.replica_id for c in serving if not c.ready and c.pool_id not in self.startups
            }
            routes: dict[Hashable, list[str]] = {}
            ahead = 0  # tasks before it in the order that take a slot it could have taken
            for e in order:
                member = members.get(e.task_id)
                if member is not None:
                    best = min(mine, key=lambda r: heaps[r][0]) if mine else None
                    start = heaps[best][0] if best is not None else None
                    # a start that waits on a load never measured is a guess: unknown, which
                    # is not late (a deadline is not refused on it)
                    probability = (
                        None
                        if best in guessed
                        else self._on_time(member, start, rate, deadline_in_ms(member))
                    )
                    out[e.task_id] = Estimate(ahead, start, probability)
                if e.model_id != first.model_id:
                    continue
                theirs = routes.get(e.route_key)
                if theirs is None:  # not known to run anywhere: it may take one of ours
                    allowed: list[str] = [c.replica_id for c in _allowed(e, serving)]
                    theirs = routes[e.route_key] = [r for r in allowed if heaps[r]] or mine
                if not theirs:
                    continue
                slot = min(theirs, key=lambda r: heaps[r][0])
                service = estimates.service_ms(e.max_tokens, self.rate(pools[slot]))
                heapq.heapreplace(heaps[slot], heaps[slot][0] + max(0.0, service))
                if slot in mine:
                    ahead += 1
        return out

    def _left_to_start(self, cand: placement.Candidate) -> float:
        """A Starting replica's time left to Ready: the pool's start-up time less what its
        load has done already (counted again from each request, the whole start-up made a
        pool loading for seconds look as far off as a cold one and refused deadlines it
        met). One slower than expected is still a tenth of it off, never due at once."""
        whole = self.startup_ms(cand.pool_id)
        return max(whole - cand.starting_ms, whole * 0.1)

    def _slot_heaps(
        self, serving: Iterable[placement.Candidate], lefts: Mapping[str, list[float]]
    ) -> dict[str, list[float]]:
        """Per replica, when each of its slots frees (ms from now), as a heap."""
        heaps: dict[str, list[float]] = {}
        for cand in serving:
            start_in = 0.0 if cand.ready else self._left_to_start(cand)
            mine = tuple(lefts.get(cand.replica_id, ()))
            source = estimates.SlotSource(start_in, cand.slots_total, mine)
            heap = [max(0.0, float(t)) for t in estimates.slot_free_times([source])]
            heapq.heapify(heap)
            heaps[cand.replica_id] = heap
        return heaps

    @staticmethod
    def _on_time(
        entry: queues.Entry,
        start: float | None,
        rate: estimates.ServiceRate,
        deadline_in_ms: float | None,
    ) -> float | None:
        if deadline_in_ms is None or start is None:
            return None
        service = estimates.service_ms(entry.max_tokens, rate)
        return estimates.on_time_probability(start, service, deadline_in_ms)


@dataclass(frozen=True)
class Estimate:
    """A queued task's place in dispatch order (0-based), predicted start in ms from now and
    on-time probability (None: unknown, or no deadline)."""

    position: int
    start_ms: float | None
    on_time_probability: float | None


def _lefts(busy: Iterable[tuple[str, float, float]]) -> dict[str, list[float]]:
    """Per replica, the estimated time left of each task it runs."""
    lefts: dict[str, list[float]] = {}
    for replica_id, service, elapsed in busy:
        lefts.setdefault(replica_id, []).append(estimates.remaining_ms(service, elapsed))
    return lefts


def _allowed(
    entry: queues.Entry, candidates: Iterable[placement.Candidate]
) -> list[placement.Candidate]:
    """The replicas `entry` may run on: its pin, prefer and avoid lists, as placement will."""
    if entry.route is not None:
        return placement.allowed(entry.route, candidates)
    pool = entry.pool_id
    return [
        c for c in candidates if c.model_id == entry.model_id and (not pool or c.pool_id == pool)
    ]
