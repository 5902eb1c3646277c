"""The bounded two-class queue: order, full policies, positions and skipping busy models."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from reconciler import queues
from state import ids
from state.errors import ErrorCode


def entry(
    task_id: str, priority: queues.Priority = "batch", model: str = "m", **extra: object
) -> queues.Entry:
    return queues.Entry(
        task_id=ids.TaskId(task_id),
        priority=priority,
        model_id=ids.ModelId(model),
        pool_id=None,
        enqueued_at=0.0,
        max_tokens=16,
        deadline_at=extra.get("deadline_at"),  # type: ignore[arg-type]
        payload=extra.get("payload"),
        target=extra.get("target", model),
    )


def order(queue: queues.TaskQueue) -> list[str]:
    return [e.task_id for e in queue.in_dispatch_order()]


def test_interactive_entries_are_dispatched_before_batch_ones_and_each_class_is_fifo() -> None:
    queue = queues.TaskQueue(10)
    for task_id, priority in [("b1", "batch"), ("i1", "interactive"), ("b2", "batch")]:
        queue.push(entry(task_id, priority))  # type: ignore[arg-type]
    queue.push(entry("i2", "interactive"))

    assert order(queue) == ["i1", "i2", "b1", "b2"]
    assert queue.pop_first(lambda e: True) == entry("i1", "interactive")


def test_a_full_queue_under_reject_refuses_the_newcomer_with_admission_reject() -> None:
    queue = queues.TaskQueue(2, "reject")
    queue.push(entry("b1"))
    queue.push(entry("b2"))

    outcome = queue.push(entry("i1", "interactive"))

    assert outcome == queues.PushOutcome(accepted=False, evicted=None)
    assert outcome.code is ErrorCode.ADMISSION_REJECT
    assert order(queue) == ["b1", "b2"]


def test_drop_lru_evicts_the_oldest_batch_entry_to_admit_an_interactive_one() -> None:
    queue = queues.TaskQueue(3, "drop-lru")
    for task_id, priority in [("i1", "interactive"), ("b1", "batch"), ("b2", "batch")]:
        queue.push(entry(task_id, priority))  # type: ignore[arg-type]

    outcome = queue.push(entry("i2", "interactive"))

    assert outcome.accepted and outcome.code is None
    assert outcome.evicted == entry("b1")
    assert queues.EVICTED_CODE is ErrorCode.QUEUE_FULL_DROP_LRU
    assert order(queue) == ["i1", "i2", "b2"]


def test_drop_lru_evicts_the_oldest_batch_entry_to_admit_a_batch_one() -> None:
    queue = queues.TaskQueue(2, "drop-lru")
    queue.push(entry("i1", "interactive"))
    queue.push(entry("b1"))

    outcome = queue.push(entry("b2"))

    assert outcome.evicted == entry("b1")
    assert order(queue) == ["i1", "b2"]


def test_drop_lru_evicts_the_oldest_interactive_entry_when_no_batch_entry_is_queued() -> None:
    queue = queues.TaskQueue(2, "drop-lru")
    queue.push(entry("i1", "interactive"))
    queue.push(entry("i2", "interactive"))

    outcome = queue.push(entry("i3", "interactive"))

    assert outcome.evicted == entry("i1", "interactive")
    assert order(queue) == ["i2", "i3"]


def test_drop_lru_refuses_a_batch_newcomer_rather_than_evict_interactive_work() -> None:
    queue = queues.TaskQueue(2, "drop-lru")
    queue.push(entry("i1", "interactive"))
    queue.push(entry("i2", "interactive"))

    outcome = queue.push(entry("b1"))

    assert outcome == queues.PushOutcome(accepted=False, evicted=None)
    assert outcome.code is ErrorCode.ADMISSION_REJECT
    assert order(queue) == ["i1", "i2"]


def test_position_counts_the_interactive_entries_ahead_of_a_batch_one() -> None:
    queue = queues.TaskQueue(10)
    queue.push(entry("b1"))
    queue.push(entry("b2"))
    queue.push(entry("i1", "interactive"))

    assert queue.position(ids.TaskId("i1")) == 0
    assert queue.position(ids.TaskId("b1")) == 1
    assert queue.position(ids.TaskId("b2")) == 2
    assert [e.task_id for e in queue.ahead_of(ids.TaskId("b2"))] == ["i1", "b1"]


def test_asking_the_position_of_a_task_that_is_not_queued_raises_key_error() -> None:
    queue = queues.TaskQueue(10)
    with pytest.raises(KeyError):
        queue.position(ids.TaskId("ghost"))


def test_pop_first_skips_entries_whose_model_is_busy() -> None:
    queue = queues.TaskQueue(10)
    queue.push(entry("i1", "interactive", model="busy"))
    queue.push(entry("b1", model="busy"))
    queue.push(entry("b2", model="idle"))

    popped = queue.pop_first(lambda e: e.model_id == "idle")

    assert popped is not None and popped.task_id == "b2"
    assert order(queue) == ["i1", "b1"]


def test_pop_first_returns_none_and_keeps_everything_when_nothing_matches() -> None:
    queue = queues.TaskQueue(10)
    queue.push(entry("b1"))

    assert queue.pop_first(lambda e: False) is None
    assert len(queue) == 1


def test_removing_a_canceled_task_frees_its_place_for_a_newcomer() -> None:
    queue = queues.TaskQueue(1, "reject")
    queue.push(entry("b1"))

    assert queue.remove(ids.TaskId("b1")) == entry("b1")
    assert queue.remove(ids.TaskId("b1")) is None
    assert queue.push(entry("b2")).accepted
    assert "b2" in queue and "b1" not in queue


def test_depth_by_priority_reports_both_classes_even_when_one_is_empty() -> None:
    queue = queues.TaskQueue(10)
    assert queue.depth_by_priority() == {"interactive": 0, "batch": 0}
    queue.push(entry("b1"))
    queue.push(entry("b2"))
    assert queue.depth_by_priority() == {"interactive": 0, "batch": 2}
    assert len(queue) == 2


def test_pushing_a_task_id_that_is_already_queued_is_a_caller_bug() -> None:
    queue = queues.TaskQueue(10)
    queue.push(entry("b1"))
    with pytest.raises(ValueError, match="already queued"):
        queue.push(entry("b1", "interactive"))


@pytest.mark.parametrize(("capacity", "policy"), [(0, "reject"), (4, "shed-low-priority")])
def test_a_queue_with_no_room_or_an_unknown_policy_cannot_be_made(
    capacity: int, policy: str
) -> None:
    with pytest.raises(ValueError):
        queues.TaskQueue(capacity, policy)  # type: ignore[arg-type]


def test_the_payload_rides_along_without_taking_part_in_equality() -> None:
    assert entry("b1", payload=object()) == entry("b1", payload=[1, 2])
    assert hash(entry("b1", payload=[1, 2])) == hash(entry("b1"))


class QueueUnderAnyOperations(RuleBasedStateMachine):
    """A ledger of every pushed task against what the queue says happened to it."""

    def __init__(self) -> None:
        super().__init__()
        self.queue = queues.TaskQueue(1)
        self.seq: dict[str, int] = {}
        self.fate: dict[str, str] = {}  # refused, evicted, popped, removed; absent = queued
        self.counter = 0

    @initialize(capacity=st.integers(1, 6), policy=st.sampled_from(queues.FULL_POLICIES))
    def make(self, capacity: int, policy: queues.FullPolicy) -> None:
        self.queue = queues.TaskQueue(capacity, policy)

    @rule(
        priority=st.sampled_from(queues.PRIORITIES),
        model=st.sampled_from(["a", "b", "c"]),
        deadline_at=st.none() | st.integers(0, 5).map(float),
        pin=st.sampled_from(["", "p"]),
    )
    def push(self, priority: queues.Priority, model: str, deadline_at: float, pin: str) -> None:
        task_id = f"t{self.counter}"
        self.counter += 1
        batch_was_queued = self.queue.depth_by_priority()["batch"] > 0
        was_full = len(self.queue) == self.queue.capacity
        new = entry(task_id, priority, model, deadline_at=deadline_at, target=(model, pin))
        outcome = self.queue.push(new)
        self.seq[task_id] = self.counter
        if not outcome.accepted:
            assert was_full
            self.fate[task_id] = "refused"
        if outcome.evicted is not None:
            assert outcome.accepted and was_full and self.queue.full_policy == "drop-lru"
            assert outcome.evicted.task_id not in self.fate
            self.fate[outcome.evicted.task_id] = "evicted"
            if outcome.evicted.priority == "interactive":
                # Only an interactive newcomer, and only when no batch work is queued.
                assert priority == "interactive" and not batch_was_queued

    @precondition(lambda self: self.counter > 0)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        task_id = f"t{data.draw(st.integers(0, self.counter - 1))}"
        removed = self.queue.remove(ids.TaskId(task_id))
        if removed is not None:
            assert task_id not in self.fate
            self.fate[task_id] = "removed"

    @rule(model=st.sampled_from(["a", "b"]))
    def pop_first(self, model: str) -> None:
        expected = next((e for e in self.queue.in_dispatch_order() if e.model_id == model), None)
        popped = self.queue.pop_first(lambda e: e.model_id == model)
        assert popped == expected
        if popped is not None:
            assert popped.task_id not in self.fate
            self.fate[popped.task_id] = "popped"

    @rule(
        models=st.sets(st.sampled_from(["a", "b", "c"])),
        refused=st.sets(st.integers(0, 30)),
    )
    def pop_first_of_free_models(self, models: set[str], refused: set[int]) -> None:
        """Looking only at the free models' entries finds what a scan of the whole queue
        finds, also when the predicate refuses some entries of those models."""

        def accepts(e: queues.Entry) -> bool:
            return e.model_id in models and int(e.task_id[1:]) not in refused

        expected = next((e for e in self.queue.in_dispatch_order() if accepts(e)), None)
        popped = self.queue.pop_first(accepts, models={ids.ModelId(m) for m in models})
        assert popped == expected
        if popped is not None:
            self.fate[popped.task_id] = "popped"

    @rule(now=st.integers(0, 6).map(float))
    def take_expired(self, now: float) -> None:
        expected = {
            e.task_id
            for e in self.queue.in_dispatch_order()
            if e.deadline_at is not None and e.deadline_at <= now
        }
        taken = self.queue.take_expired(now)
        assert {e.task_id for e in taken} == expected and len(taken) == len(expected)
        for e in taken:
            self.fate[e.task_id] = "expired"

    @invariant()
    def targets_name_the_first_entry_of_each_target(self) -> None:
        entries = self.queue.in_dispatch_order()
        by_push = sorted(entries, key=lambda e: self.seq[e.task_id])
        firsts: dict[object, str] = {}
        for e in by_push:
            firsts.setdefault(e.target, e.task_id)
        assert {e.target: e.task_id for e in self.queue.targets()} == firsts
        for target in firsts:
            assert [e.task_id for e in self.queue.of_target(target)] == [
                e.task_id for e in by_push if e.target == target
            ]

    @invariant()
    def never_exceeds_capacity(self) -> None:
        assert len(self.queue) <= self.queue.capacity

    @invariant()
    def dispatch_order_is_priority_then_arrival(self) -> None:
        entries = self.queue.in_dispatch_order()
        rank = {p: i for i, p in enumerate(queues.PRIORITIES)}
        keys = [(rank[e.priority], self.seq[e.task_id]) for e in entries]
        assert keys == sorted(keys)
        assert [self.queue.position(e.task_id) for e in entries] == list(range(len(entries)))

    @invariant()
    def every_pushed_task_is_in_exactly_one_place(self) -> None:
        queued = {e.task_id for e in self.queue.in_dispatch_order()}
        assert queued.isdisjoint(self.fate)
        assert queued | set(self.fate) == set(self.seq)
        depth = self.queue.depth_by_priority()
        assert sum(depth.values()) == len(queued) == len(self.queue)


QueueUnderAnyOperations.TestCase.settings = settings(max_examples=150, stateful_step_count=40)
TestTheQueueKeepsItsPromisesUnderAnySequenceOfOperations = QueueUnderAnyOperations.TestCase


def test_next_deadline_is_the_earliest_of_the_entries_still_queued() -> None:
    """The loop sleeps until it (a queued task fails when its deadline passes, not at the
    next poll); entries that left the queue no longer count."""
    queue = queues.TaskQueue(8, "reject")
    assert queue.next_deadline() is None
    queue.push(entry("late", deadline_at=30.0))
    queue.push(entry("soon", deadline_at=10.0))
    queue.push(entry("none"))
    assert queue.next_deadline() == 10.0
    queue.remove(ids.TaskId("soon"))  # started or canceled
    assert queue.next_deadline() == 30.0
    assert [e.task_id for e in queue.take_expired(31.0)] == ["late"]
    assert queue.next_deadline() is None


def test_an_entry_replaced_onto_another_model_keeps_its_place_and_is_found_by_it() -> None:
    q = queues.TaskQueue(capacity=8)
    for task_id, model in [("a", "old"), ("b", "new"), ("c", "old"), ("d", "new")]:
        q.push(entry(task_id, model=model))

    q.replace(entry("c", model="new"))

    assert [e.task_id for e in q] == ["a", "b", "c", "d"]
    assert q.count_of_model(ids.ModelId("new")) == 3
    assert q.count_of_model(ids.ModelId("old")) == 1
    assert [e.task_id for e in q.of_target("new")] == ["b", "c", "d"]
    taken = q.pop_first(lambda e: True, models={ids.ModelId("new")})
    assert taken is not None and taken.task_id == "b"
    taken = q.pop_first(lambda e: True, models={ids.ModelId("new")})
    assert taken is not None and taken.task_id == "c"
    with pytest.raises(KeyError):
        q.replace(entry("zz"))
