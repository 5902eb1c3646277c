"""Admitting one parsed task to the dispatcher's queue, or writing why it was not admitted.

`dispatch.Dispatcher.admit` calls `admit(dispatcher, run)` for every task the daemon takes.
In order: the task's model and pool resolved (`admission.resolve`), the guardrails
(`admission.check`), the session's limits (`state.sessions.refusal`), the deadline's
feasibility from the learned rates; then the queue's own policy (reject, or drop-lru evicting
the oldest batch task). A refused task gets a `rejected` result, an evicted one a `failed`
result with `QUEUE_FULL_DROP_LRU`; an admitted one counts a session turn and its `queued`
frame carries its place, predicted start and on-time probability. A task recovered after a
restart was accepted already: only its target and guardrails are checked again. The checks
themselves are pure (`admission`, `estimates` through `rates.Rates.predict`); this module
applies them to the dispatcher's live queue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import TYPE_CHECKING

from reconciler import admission, logs, placement, queues, rates, tasking
from state import errors, failpoints, ids, results, sessions
from state.errors import ErrorCode, ErrorEnvelope

if TYPE_CHECKING:
    from reconciler import dispatch

log = logs.get("dispatch")


def _drained_mid_task(
    d: dispatch.Dispatcher, run: tasking.TaskRun, problem: ErrorEnvelope
) -> ErrorEnvelope:
    """A task the previous daemon was running on a pool drained on request, found again at
    a restart (the daemon was killed during the drain): it cannot run there again, and it
    ends as a drain's deadline would have ended it (retriable WORKER_RESET: the client sends
    it again), not as a task the pool refused (POOL_UNAVAILABLE)."""
    pool_id = run.result.pool_id
    if (
        problem.code is not ErrorCode.POOL_UNAVAILABLE
        or run.result.attempts == 0
        or pool_id is None
        or pool_id not in d.pools.drained
    ):
        return problem
    return errors.envelope(
        ErrorCode.WORKER_RESET,
        f"the daemon restarted while the task ran on pool {pool_id!r}, which is drained on "
        "request: the task cannot run there again",
        retry_after_ms=1000,
        hint=f"submit it again; POST /v1/pools/{pool_id}/reload serves the pool again",
    )


def admit(d: dispatch.Dispatcher, run: tasking.TaskRun, *, recovered: bool) -> None:
    state = d.config.state
    assert state is not None
    d.runs[run.task_id] = run
    target = admission.resolve(run.task, state, reloading=d.pools.reloading)
    if isinstance(target, ErrorEnvelope):
        return _reject(d, run, target, recovered=recovered)
    run.model_id, run.pool_id = target.model_id, target.pool_id
    run.result.model = target.model_id
    run.result.model_digest = (
        state.models[target.model_id].digest if (target.model_id in state.models) else None
    )
    problem = admission.check(
        run.task, target, state=state, pools=d.pools.views(), blocked=d.blocked()
    )
    if (
        problem is not None
        and problem.code is ErrorCode.POOL_UNAVAILABLE
        and d.reload_touches(target.model_id, target.pool_id)
    ):
        # the reload's edit of orch.yaml took the task's pool away, and puts it back if the
        # reload fails: the task waits for the outcome (`Dispatcher._fail_unservable`)
        problem = None
    if problem is not None and recovered:
        problem = _drained_mid_task(d, run, problem)
    if problem is None and not recovered:
        problem = session_problem(d, run)
    entry = entry_of(run)
    # only a deadline can be refused on the estimate; a recovered task was accepted already
    if problem is None and not recovered and run.task.deadline_ms is not None:
        start, probability = _estimate_new(d, entry)
        problem = admission.deadline_error(
            run.task, predicted_start_ms=start, probability=probability
        )
    if problem is not None:
        return _reject(d, run, problem, recovered=recovered)
    # a recovered task was accepted once (queued, or running when the daemon stopped): it is
    # owed its place, however full the queue is now that every such task is queued at once
    starts_now, starting = recovered, set[str]()
    if len(d.queue) >= d.queue.capacity and not recovered:  # idle slots' tasks do not wait
        starting = _starting(d, newcomer=entry)
        starts_now = _starts_now(d, entry, starting)
        starting.discard(entry.task_id)
        if not starts_now:  # who the policy may not evict: those starting, and those owed
            d.owed = {task_id for task_id in d.owed if task_id in d.queue}
            starting |= d.owed
    outcome = d.queue.push(entry, starts_now=starts_now, starting=starting)
    if recovered:  # never evicted by drop-lru for a newcomer: it was accepted before
        d.owed.add(run.task_id)
    if not outcome.accepted:
        return _reject(
            d,
            run,
            recovered=recovered,
            error=errors.envelope(
                ErrorCode.ADMISSION_REJECT,
                _full_message(d, run),
                retry_after_ms=_retry_after_ms(d),
                policy_label=d.queue.full_policy,
            ),
        )
    if outcome.evicted is not None:
        _evict(d, outcome.evicted)
    if run.task.session_id is not None:
        sid, now = run.task.session_id, d.clock.now()
        sessions.count_turn(d.sessions, sid, run.task_id, now=now)
        failpoints.hit("after_session_turn")
        # as at acceptance: this turn, not later ones (a recovered task keeps those it was
        # accepted with; turns and tokens since, or the TTL run down, are not this task's)
        if not (recovered and run.result.budgets is not None):
            run.result.budgets = _budgets(d, run)
    d.unannounced.append(entry)  # its `queued` frame once the whole batch is in: `announce`


def announce(d: dispatch.Dispatcher) -> list[tuple[tasking.TaskRun, Exception]]:
    """Write the `queued` frame and result of every task admitted since the last call, with
    its place and predicted start in the queue as it stands now, after the whole batch: an
    interactive task later in the same burst is already ahead of a batch task in its estimate
    (estimated one by one, the batch task was told it would start before it). All of them are
    estimated in one pass over the queue (`rates.Rates.predict_queued`). A task whose write
    fails is taken out of the queue and returned with the error, for the caller to handle as
    a failed take (a full disk: its file stays in active/ and recovery retries it)."""
    pending, d.unannounced = d.unannounced, []
    live = [entry for entry in pending if entry.task_id in d.queue]  # not evicted meanwhile
    if not live:
        return []
    order = d.queue.in_dispatch_order()
    try:
        found = _estimates(d, live, order)
    except Exception:  # a bug in the arithmetic must not stop the loop or strand the batch
        log.exception("could not estimate the starts of %d queued tasks", len(live))
        places = {e.task_id: n for n, e in enumerate(order)}
        found = {e.task_id: rates.Estimate(places[e.task_id], None, None) for e in live}
    # the tasks idle slots take at the next dispatch wait behind nobody and hold no place:
    # a task is told how many that will still wait are ahead of it, not those starting now
    starting = _starting(d)
    waiting_ahead, ahead = {}, 0
    for e in order:
        waiting_ahead[e.task_id] = 0 if e.task_id in starting else ahead
        ahead += e.task_id not in starting
    failed: list[tuple[tasking.TaskRun, Exception]] = []
    for entry in live:
        run, estimate = entry.payload, found[entry.task_id]
        assert isinstance(run, tasking.TaskRun)
        try:
            d.books.queued(
                run,
                position=waiting_ahead[entry.task_id],
                predicted_start_ms=None if estimate.start_ms is None else round(estimate.start_ms),
                on_time_probability=estimate.on_time_probability,
                budgets=run.result.budgets,
            )
        except Exception as exc:  # nothing half-admitted keeps the id or sits in the queue
            d.queue.remove(entry.task_id)
            if d.runs.get(run.task_id) is run:
                del d.runs[run.task_id]
            failed.append((run, exc))
    return failed


def _estimates(
    d: dispatch.Dispatcher, live: list[queues.Entry], order: tuple[queues.Entry, ...]
) -> dict[str, rates.Estimate]:
    now = d.clock.monotonic()
    return d.rates.predict_queued(
        live,
        order,
        candidates=d.pools.candidates(),
        busy=_busy(d, now),
        deadline_in_ms=lambda e: None if e.deadline_at is None else (e.deadline_at - now) * 1000,
    )


def _busy(d: dispatch.Dispatcher, now: float) -> list[tuple[str, float, float]]:
    """Per running task: its replica, estimated service ms and elapsed ms."""
    return [(r.replica_id, r.service_ms, (now - r.started_mono) * 1000) for r in d.running.values()]


def _budgets(d: dispatch.Dispatcher, run: tasking.TaskRun) -> results.Budgets | None:
    """What the task's session has left, its turn counted (None without a session)."""
    sid, state = run.task.session_id, d.config.state
    if sid is None or state is None:
        return None
    session = d.sessions.get(sid)
    if session is None:
        return None
    found = sessions.budgets(session, state.sessions, now=d.clock.now())
    # tokens as a new turn may ask for them: this task's max_tokens and those of the
    # session's other live turns are held for them, as the refusal of a turn counts them
    return found.model_copy(update={"tokens_budget_remaining": session_tokens_left(d, sid)})


def _starts_now(d: dispatch.Dispatcher, entry: queues.Entry, starting: set[str]) -> bool:
    """Whether a full queue must not count against `entry`: tasks queued in this burst that
    idle slots will take at once leave the queue on the next dispatch, so they hold no place
    in it; and `entry` itself never waits when an idle slot takes it at once. A burst larger
    than the queue landing on idle replicas thus runs whole, and one larger than the queue
    and the idle slots together is refused only past both, however the daemon happened to
    batch its arrivals. Looked at only when the queue is full (`starting`: `_starting` with
    `entry` as the newcomer)."""
    if entry.task_id in starting:
        return True
    return len(d.queue) - len(starting) < d.queue.capacity


def _starting(d: dispatch.Dispatcher, newcomer: queues.Entry | None = None) -> set[str]:
    """The queued tasks (and `newcomer`, at its place in the queue) that idle slots take at
    the next dispatch, so they will not wait: the dispatch played out, each task in dispatch
    order placed as placement would place it now (its model or pool, its pins, its context,
    its pool's max_tokens), the slot it takes then busy. A task pinned to a busy pool is not
    counted for another pool's idle slot: it waits."""
    candidates = {c.replica_id: c for c in d.pools.candidates()}
    free: dict[str, int] = {}
    for c in candidates.values():
        if c.feasible:
            free[c.model_id] = free.get(c.model_id, 0) + c.slots_total - c.slots_busy
    out: set[str] = set()
    if not free:
        return out
    order = list(d.queue.in_dispatch_order())
    if newcomer is not None:  # last of its class: interactive tasks go before batch ones
        at = len(order)
        if newcomer.priority == "interactive":
            at = sum(1 for e in order if e.priority == "interactive")
        order.insert(at, newcomer)
    for e in order:
        if not free.get(e.model_id):  # nothing free for its model: it waits
            continue
        want = e.route or placement.Want(task_id=e.task_id, model_id=e.model_id)
        decision = placement.choose(want, list(candidates.values()))
        if decision.outcome != "assigned" or decision.replica_id is None:
            continue
        taken = candidates[decision.replica_id]
        candidates[taken.replica_id] = dataclasses.replace(taken, slots_busy=taken.slots_busy + 1)
        free[e.model_id] -= 1
        out.add(e.task_id)
        if not any(free.values()):
            break
    return out


def _full_message(d: dispatch.Dispatcher, run: tasking.TaskRun) -> str:
    """Why a full queue refused `run`, in the words of its policy."""
    depth, capacity, policy = len(d.queue), d.queue.capacity, d.queue.full_policy
    full = f"the queue is full ({capacity} tasks, policy {policy})"
    # over the capacity: tasks of this burst idle slots take at the next dispatch (they hold
    # no place, `_starts_now`), or a capacity lowered in orch.yaml below what already waited
    starting = len(_starting(d)) if depth > capacity else 0
    if depth - starting > capacity:
        full = (
            f"the queue is full: {depth - starting} tasks wait, over its capacity of {capacity} "
            "(accepted before orch.yaml lowered it, or before the daemon restarted; policy "
            f"{policy})"
        )
    elif depth > capacity:
        full = (
            f"the queue is full ({capacity} tasks wait, its capacity, and {starting} more of "
            f"this burst are starting on idle slots; policy {policy})"
        )
    if d.queue.full_policy == "reject":
        return full
    waiting = d.queue.in_dispatch_order()
    if any(e.priority == "batch" and e.task_id in d.owed for e in waiting):
        return (
            f"{full}: the batch tasks waiting were accepted before the daemon restarted, "
            "and are not evicted"
        )
    # drop-lru refuses only a batch newcomer while only interactive tasks wait
    return f"{full}: only interactive tasks wait, and a batch task never evicts one"


def session_tokens_left(d: dispatch.Dispatcher, session_id: str) -> int | None:
    """What a new turn of the session may ask for under its token budget: the budget less
    what its finished turns wrote and up to max_tokens for each still queued or running
    (None without a budget)."""
    state = d.config.state
    budget = state.sessions.token_budget if state is not None else None
    if budget is None:
        return None
    session = d.sessions.get(session_id)
    spent = session.tokens_out if session is not None else 0
    return max(0, budget - spent - sum(_live_turns(d, session_id)))


def _live_turns(d: dispatch.Dispatcher, session_id: str, *, but: str | None = None) -> list[int]:
    """The max_tokens of the session's tasks queued or running (but task `but`): the turns
    of the session as it is now (a session deleted or started over meanwhile took its
    turns with it)."""
    session = d.sessions.get(session_id)
    turns = set(session.turn_task_ids) if session is not None else set()
    return [
        r.task.max_tokens
        for r in d.runs.values()
        if r.task.session_id == session_id and r.task_id != but and r.task_id in turns
    ]


def session_problem(d: dispatch.Dispatcher, run: tasking.TaskRun) -> ErrorEnvelope | None:
    """Why the task's session may take no more turns now (None when it may, or has none)."""
    sid, state = run.task.session_id, d.config.state
    if sid is None or state is None:
        return None
    # the budget holds what the session's tasks may still write: up to max_tokens for each of
    # its tasks still queued or running, beside what its finished ones wrote
    others = _live_turns(d, sid, but=run.task_id)

    def refusal() -> ErrorEnvelope | None:
        return sessions.refusal(
            d.sessions,
            sid,
            state.sessions,
            now=d.clock.now(),
            max_tokens=run.task.max_tokens,
            pending_tokens=sum(others) if state.sessions.token_budget is not None else 0,
            in_use=bool(others),  # a turn still queued or running: the session is in use
            task_id=run.task_id,
        )

    problem = refusal()
    if (
        problem is not None
        and run.task.labels.get(sessions.FROM_LABEL) == sessions.FROM_OPENAI_USER
        and problem.code in (ErrorCode.SESSION_EXPIRED, ErrorCode.SESSION_TURNS_EXCEEDED)
    ):
        # a session the client never named (OpenAI's `user`, an end-user tag) is not a
        # conversation it can replace: past its TTL or turns it starts over, not locks out
        sessions.start_over(d.sessions, sid, now=d.clock.now())
        logs.emit(
            log,
            "session.started_over",
            f"Session {sid} (from the OpenAI user field) started over: {problem.message}.",
            session_id=sid,
        )
        problem = refusal()
    return problem


def entry_of(run: tasking.TaskRun) -> queues.Entry:
    """The queue entry of an admitted task, from its run (model and pool bound)."""
    return queues.Entry(
        task_id=ids.TaskId(run.task_id),
        priority=run.task.priority,
        model_id=ids.ModelId(run.model_id),
        pool_id=ids.PoolId(run.pool_id) if run.pool_id else None,
        enqueued_at=run.accepted_mono,
        max_tokens=run.task.max_tokens,
        deadline_at=run.deadline_mono,
        payload=run,
        target=target_of(run),
        route=dataclasses.replace(
            # with its context: its start is estimated over the replicas that can hold it
            placement.Want.of(
                ids.TaskId(run.task_id),
                run.task,
                context_tokens=admission.context_tokens(run.task),
            ),
            model_id=ids.ModelId(run.model_id),
        ),
    )


def target_of(run: tasking.TaskRun) -> Hashable:
    """What decides whether the task can be served at all: its model, pool and pinned pool,
    and the prefer/avoid lists that narrow its pools without a fallback
    (`dispatch.Dispatcher._fail_unservable` checks one task per target)."""
    p = run.task.placement
    pinned = p.pin_pool if p.mode == "pin" else None
    narrowed = (
        ()
        if pinned or p.allow_fallback
        else (tuple(sorted(p.prefer_pools)), tuple(sorted(p.avoid_pools)))
    )
    return (run.model_id, run.pool_id, pinned, narrowed)


def _reject(
    d: dispatch.Dispatcher, run: tasking.TaskRun, error: ErrorEnvelope, *, recovered: bool
) -> None:
    """A task refused at its admission is `rejected`; one accepted before a restart and no
    longer servable after it `failed`, as it would have while the daemon ran."""
    d.runs.pop(run.task_id, None)
    d.books.finish(run, "failed" if recovered else "rejected", error=error)


def _evict(d: dispatch.Dispatcher, entry: queues.Entry) -> None:
    run = d.runs.pop(entry.task_id)
    d.books.finish(
        run,
        "failed",
        error=errors.envelope(
            ErrorCode.QUEUE_FULL_DROP_LRU,
            "dropped from the full queue to make room for newer work (policy drop-lru)",
            retry_after_ms=_retry_after_ms(d),
            policy_label="drop-lru",
        ),
    )


def _retry_after_ms(d: dispatch.Dispatcher) -> int:
    """About how long until a queue place frees for this client: the k-th place to free,
    k the clients turned away before it whose time has not come yet (and the tasks over a
    lowered capacity, which take the first places). A place frees when a queued task
    starts, so the k-th place frees at the k-th predicted start of the queue (a task ending
    frees one only when a queued task can take its slot). Telling every refused client the
    soonest start sent them all back at once, to one free place, and most were refused
    again; spread this way they come back one a place. Past the queue's last start, a place
    a mean gap between starts later each."""
    now = d.clock.monotonic()
    d.promised = [t for t in d.promised if t > now]
    order = d.queue.in_dispatch_order()
    found: list[rates.Estimate] = []
    try:
        found = list(_estimates(d, list(order), order).values())
    except Exception:  # a bug in the arithmetic must not turn a refusal into a crash
        log.exception("could not estimate the queue's starts for a retry delay")
    starts = sorted(max(0.0, e.start_ms) for e in found if e.start_ms is not None)
    k = len(d.promised) + max(0, len(d.queue) - d.queue.capacity)
    if not starts:  # nothing to estimate from (no replica yet): a second a place
        wait_ms = 1000.0 * (k + 1)
    elif k < len(starts):
        wait_ms = starts[k]
    else:
        gap = max(starts[-1] / len(starts), MIN_RETRY_MS)
        wait_ms = starts[-1] + gap * (k - len(starts) + 1)
    wait_ms = max(MIN_RETRY_MS, wait_ms)
    d.promised.append(now + wait_ms / 1000)
    return int(wait_ms)


MIN_RETRY_MS = 250.0


def _estimate(
    d: dispatch.Dispatcher, entry: queues.Entry, ahead: tuple[queues.Entry, ...]
) -> tuple[float | None, float | None]:
    """Predicted start (ms) and on-time probability of `entry` behind `ahead`."""
    now = d.clock.monotonic()
    return d.rates.predict(
        entry,
        ahead,
        candidates=d.pools.candidates(),
        busy=_busy(d, now),
        deadline_in_ms=None if entry.deadline_at is None else (entry.deadline_at - now) * 1000,
    )


def _estimate_new(d: dispatch.Dispatcher, entry: queues.Entry) -> tuple[float | None, float | None]:
    """As `_estimate`, for a task not yet queued: behind what it would not overtake."""
    ahead = tuple(
        e
        for e in d.queue.in_dispatch_order()
        if e.priority == "interactive" or entry.priority == "batch"
    )
    return _estimate(d, entry, ahead)
