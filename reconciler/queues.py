"""The bounded task queue shared by the two priority classes, and its full-queue policies.

Admission pushes every accepted task here; the dispatcher pops the first entry whose model has
a free replica, and the estimates read positions and depths for `queue_position`,
`predicted_start_ms` and the `queue_depth` of SSE metrics frames. The queue is plain data: no
I/O and no clock (entries carry the time they were enqueued), so its policies are tested alone.

Order: `interactive` entries are dispatched before `batch` ones, and each class is FIFO in the
order entries were pushed. One capacity is shared by both classes.

When the queue is full, `push` applies the full policy:

- `reject`: the newcomer is refused (`accepted=False`; admission answers `ADMISSION_REJECT`).
- `drop-lru`: the oldest batch entry is evicted, else the oldest interactive one, and the
  newcomer is enqueued; the evicted entry is returned so its task can fail with
  `QUEUE_FULL_DROP_LRU`. Corner case: a *batch* newcomer meeting a queue that holds only
  interactive entries is refused like under `reject` (`ADMISSION_REJECT`): evicting
  interactive work to admit batch work would invert the priorities the classes promise.

`position(task_id)` is the 0-based number of entries the dispatcher would take before this
one in priority order, so interactive entries count for a batch one (the spec leaves open
whether `queue_position` counts the other class; counting it is what predicts the wait).
It is a snapshot: a later interactive arrival moves batch entries back, and `pop_first` skips
entries whose model is busy, so an entry may also be dispatched earlier than its position.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from reconciler import placement
from state import ids
from state.errors import ErrorCode

Priority = Literal["interactive", "batch"]
FullPolicy = Literal["reject", "drop-lru"]

PRIORITIES: tuple[Priority, ...] = ("interactive", "batch")  # dispatch order
FULL_POLICIES: tuple[FullPolicy, ...] = ("reject", "drop-lru")

_V = TypeVar("_V")

REFUSED_CODE = ErrorCode.ADMISSION_REJECT  # for a newcomer that was not enqueued
EVICTED_CODE = ErrorCode.QUEUE_FULL_DROP_LRU  # for an entry evicted to make room


@dataclass(frozen=True)
class Entry:
    """One queued task: what dispatch and the estimates need, plus the caller's own payload."""

    task_id: ids.TaskId
    priority: Priority
    model_id: ids.ModelId
    pool_id: ids.PoolId | None
    enqueued_at: float  # monotonic seconds, for ages and metrics; order is push order
    max_tokens: int
    deadline_at: float | None  # monotonic seconds, or None without a deadline
    payload: object = field(default=None, compare=False, repr=False)
    # what decides whether the task can be served at all (the dispatcher's model, pool and
    # pin): entries of one target are checked once for all of them (`targets`)
    target: Hashable = field(default=None, compare=False, repr=False)
    # the replicas it may run on (its model or pool, pin, prefer and avoid lists), for the
    # estimates of its start; None: any replica of its model (and pool)
    route: placement.Want | None = field(default=None, compare=False, repr=False)

    @functools.cached_property
    def route_key(self) -> Hashable:
        """Entries with one key are estimated over the same replicas: the route less its
        task id (computed once: the estimates ask it of every entry along the queue)."""
        if self.route is None:
            return (self.model_id, self.pool_id)
        return dataclasses.replace(self.route, task_id=ids.TaskId(""))


@dataclass(frozen=True)
class PushOutcome:
    """`accepted` says whether the newcomer is queued; `evicted` is whom drop-lru removed."""

    accepted: bool
    evicted: Entry | None = None

    @property
    def code(self) -> ErrorCode | None:
        """The error code for the newcomer: `ADMISSION_REJECT` when refused, else None."""
        return None if self.accepted else REFUSED_CODE


class TaskQueue:
    """A bounded two-class queue; see the module docstring for order and full policies."""

    def __init__(self, capacity: int, full_policy: FullPolicy = "reject") -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, got {capacity}")
        if full_policy not in FULL_POLICIES:
            raise ValueError(
                f"queue full_policy must be one of {FULL_POLICIES}, got {full_policy!r}"
            )
        self.capacity = capacity
        self.full_policy: FullPolicy = full_policy
        # dicts keep insertion order, which is FIFO order, and remove by id in O(1).
        self._classes: dict[Priority, dict[ids.TaskId, Entry]] = {p: {} for p in PRIORITIES}
        # Indexes, so a dispatch pass costs what it places, not the queue's length (a pass
        # runs after every task that ends, with thousands queued): per class and model the
        # entries in push order (their push number), per target the entries, and the
        # deadlines in a heap (an entry gone since is skipped when its deadline comes up).
        self._seq = 0
        self._by_model: dict[tuple[Priority, ids.ModelId], dict[ids.TaskId, int]] = {}
        self._by_target: dict[Hashable, dict[ids.TaskId, Entry]] = {}
        self._deadlines: list[tuple[float, int, ids.TaskId]] = []

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._classes.values())

    def __contains__(self, task_id: object) -> bool:
        return any(task_id in entries for entries in self._classes.values())

    def __iter__(self) -> Iterator[Entry]:
        """Entries in dispatch order."""
        for priority in PRIORITIES:
            yield from self._classes[priority].values()

    def push(
        self, entry: Entry, *, starts_now: bool = False, starting: Collection[str] = ()
    ) -> PushOutcome:
        """Enqueue `entry`, applying the full policy when the queue is at capacity, unless
        the entry `starts_now`: an idle slot will take it at once, so it never waits. Entries
        `starting` (idle slots take them at the next dispatch) are never evicted for it."""
        if entry.priority not in PRIORITIES:
            raise ValueError(f"unknown priority {entry.priority!r}")
        if entry.task_id in self:
            # Admission answers DUPLICATE_TASK_ID before it gets here; a repeat is a bug.
            raise ValueError(f"task {entry.task_id!r} is already queued")
        evicted: Entry | None = None
        if len(self) >= self.capacity and not starts_now:
            if self.full_policy == "reject":
                return PushOutcome(accepted=False)
            evicted = self._victim_for(entry, starting)
            if evicted is None:
                return PushOutcome(accepted=False)
            self._drop(evicted)
        self._add(entry)
        return PushOutcome(accepted=True, evicted=evicted)

    def _add(self, entry: Entry) -> None:
        self._seq += 1
        self._classes[entry.priority][entry.task_id] = entry
        self._by_model.setdefault((entry.priority, entry.model_id), {})[entry.task_id] = self._seq
        self._by_target.setdefault(entry.target, {})[entry.task_id] = entry
        if entry.deadline_at is not None:
            heapq.heappush(self._deadlines, (entry.deadline_at, self._seq, entry.task_id))
            if len(self._deadlines) > 2 * len(self) + 64:  # mostly entries gone since
                self._deadlines = [d for d in self._deadlines if d[2] in self]
                heapq.heapify(self._deadlines)

    def _drop(self, entry: Entry) -> None:
        del self._classes[entry.priority][entry.task_id]
        key = (entry.priority, entry.model_id)
        same_model = self._by_model[key]
        del same_model[entry.task_id]
        if not same_model:
            del self._by_model[key]
        same_target = self._by_target[entry.target]
        del same_target[entry.task_id]
        if not same_target:
            del self._by_target[entry.target]

    def _victim_for(self, newcomer: Entry, starting: Collection[str] = ()) -> Entry | None:
        """The oldest batch entry that will wait, else the oldest interactive one (not for a
        batch newcomer); None when there is none."""
        batch = (e for e in self._classes["batch"].values() if e.task_id not in starting)
        if (oldest := next(batch, None)) is not None:
            return oldest
        if newcomer.priority == "batch":
            return None  # never evict interactive work for batch work
        interactive = self._classes["interactive"].values()
        return next((e for e in interactive if e.task_id not in starting), None)

    def replace(self, entry: Entry) -> None:
        """Put `entry` in the place of the queued entry of its task id, keeping its place in
        the order (its model and target may differ: a task bound to its pool's model follows
        the pool onto another). Raises KeyError when the task is not queued."""
        old = self._classes[entry.priority][entry.task_id]
        seq = self._by_model[(old.priority, old.model_id)][entry.task_id]
        self._drop(old)
        self._by_model.setdefault((entry.priority, entry.model_id), {})[entry.task_id] = seq
        self._by_target.setdefault(entry.target, {})[entry.task_id] = entry
        self._classes[entry.priority][entry.task_id] = entry
        # back in push order (rare: an edit of orch.yaml), which the dicts keep by insertion
        seqs = {task_id: n for by_id in self._by_model.values() for task_id, n in by_id.items()}

        def in_order(entries: dict[ids.TaskId, _V]) -> dict[ids.TaskId, _V]:
            return dict(sorted(entries.items(), key=lambda item: seqs[item[0]]))

        self._classes[entry.priority] = in_order(self._classes[entry.priority])
        key = (entry.priority, entry.model_id)
        self._by_model[key] = in_order(self._by_model[key])
        self._by_target[entry.target] = in_order(self._by_target[entry.target])

    def remove(self, task_id: ids.TaskId) -> Entry | None:
        """Take a task out (cancel, shutdown); None when it is not queued."""
        for entries in self._classes.values():
            entry = entries.get(task_id)
            if entry is not None:
                self._drop(entry)
                return entry
        return None

    def pop_first(
        self, predicate: Callable[[Entry], bool], *, models: Collection[ids.ModelId] | None = None
    ) -> Entry | None:
        """Remove and return the first entry in dispatch order that `predicate` accepts.

        The dispatcher passes "its model has a free replica", so a task for a busy model does
        not hold back a task for an idle one behind it. With `models` (the models that have a
        free replica) only their entries are looked at, still in dispatch order, so a pass
        with nothing free costs nothing however long the queue.
        """
        for entry in self._candidates(models):
            if predicate(entry):
                self._drop(entry)
                return entry
        return None

    def _candidates(self, models: Collection[ids.ModelId] | None) -> Iterator[Entry]:
        if models is None:
            yield from self
            return
        for priority in PRIORITIES:
            entries = self._classes[priority]
            lists = [self._by_model.get((priority, m)) for m in models]
            orders = [((seq, tid) for tid, seq in lst.items()) for lst in lists if lst]
            for _, task_id in orders[0] if len(orders) == 1 else heapq.merge(*orders):
                yield entries[task_id]

    def next_deadline(self) -> float | None:
        """The earliest deadline of a queued entry (monotonic seconds), None without one."""
        while self._deadlines:
            deadline_at, _, task_id = self._deadlines[0]
            if any(
                (e := entries.get(task_id)) is not None and e.deadline_at == deadline_at
                for entries in self._classes.values()
            ):
                return deadline_at
            heapq.heappop(self._deadlines)  # its entry left the queue (started, canceled)
        return None

    def take_expired(self, now: float) -> list[Entry]:
        """Remove and return the entries whose deadline is `now` or earlier."""
        expired: list[Entry] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline_at, _, task_id = heapq.heappop(self._deadlines)
            for entries in self._classes.values():
                entry = entries.get(task_id)
                if entry is not None and entry.deadline_at == deadline_at:
                    self._drop(entry)
                    expired.append(entry)
        return expired

    def count_of_model(self, model_id: ids.ModelId) -> int:
        """How many queued entries, of either class, run `model_id`."""
        return sum(len(self._by_model.get((p, model_id), {})) for p in PRIORITIES)

    def targets(self) -> list[Entry]:
        """The first queued entry of each distinct `target`."""
        return [next(iter(entries.values())) for entries in self._by_target.values()]

    def of_target(self, target: Hashable) -> list[Entry]:
        """The queued entries of `target`, in push order."""
        return list(self._by_target.get(target, {}).values())

    def in_dispatch_order(self) -> tuple[Entry, ...]:
        """Interactive entries in FIFO order, then batch entries in FIFO order."""
        return tuple(self)

    def depth_by_priority(self) -> Mapping[Priority, int]:
        """How many entries each class holds; both classes are always present."""
        return {priority: len(self._classes[priority]) for priority in PRIORITIES}

    def position(self, task_id: ids.TaskId) -> int:
        """0-based count of entries dispatched before this one (interactive ones count for
        batch entries); raises KeyError when the task is not queued."""
        for index, entry in enumerate(self):
            if entry.task_id == task_id:
                return index
        raise KeyError(task_id)

    def ahead_of(self, task_id: ids.TaskId) -> tuple[Entry, ...]:
        """The entries dispatched before this one, in dispatch order (for predicted starts)."""
        ahead = self.in_dispatch_order()
        return ahead[: self.position(task_id)]
