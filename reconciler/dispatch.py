"""Admitted tasks: the queue, admission, placement onto Ready replicas, cancel and shutdown.

The daemon calls `admit` for each parsed task, `cancel` for each cancel request and `pump` on
every pass; `pump` leases a slot for each task it places and runs `streaming.stream` for it as
a background coroutine. All frames and results are written through `tasking.Books`, so the
event log, the result file and the spool always agree. Session rules live in
`state.sessions`, the estimate arithmetic in `estimates` (pure) and the learned speeds in the
`rates.Rates` this dispatcher owns. Admission itself (guardrails, session limits, deadline
feasibility, the queue's full policy) is applied by `admitting`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from plugins import llama_server
from reconciler import (
    admission,
    admitting,
    clocks,
    fleet,
    logs,
    placement,
    queues,
    rates,
    streaming,
    tasking,
)
from reconciler.configuring import AppliedConfig
from state import atomic, desired, errors, ids, results, sessions, statusfile, tasks
from state.errors import ErrorCode

log = logs.get("dispatch")


class PoolsView(Protocol):
    """What dispatch needs from the pool runtime (reconciler.pools.PoolRuntime)."""

    reloading: dict[str, str]  # pools a reload is changing the spec of → their model before

    @property
    def drained(self) -> Mapping[str, object]: ...  # pools drained on request → the record

    def views(self) -> dict[str, admission.PoolView]: ...

    def candidates(self) -> list[placement.Candidate]: ...

    def lease(self, replica_id: ids.ReplicaId) -> fleet.Lease: ...

    def release(self, lease: fleet.Lease) -> None: ...

    def gpu_ref(self, replica_id: ids.ReplicaId | None) -> results.GpuRef | None: ...

    def engine_version(self, replica_id: ids.ReplicaId | None) -> str | None: ...

    def stalled(self, replica_id: str, reason: str) -> None: ...


# A task that ended well refills its slot at once (`Dispatcher._ended` pumps); the full pass
# (replicas, drains, status.json) follows at once too, but at most once per this for all the
# tasks that end meanwhile: a pass after every task's end was a sixth of the loop's time
# under a stream of short tasks.
PASS_AFTER_END_S = 0.05
# how long the health check of an engine that sent no first token may take before the
# engine is taken for hung (an engine busy with a long prefill answers it at once)
HUNG_PROBE_S = 3.0
DRAIN_TICK_S = 0.25  # how often cancel requests are applied while running tasks drain


# the codes a queued task's target alone decides (see _fail_unservable)
_TARGET_CODES = (
    ErrorCode.POOL_UNAVAILABLE,
    ErrorCode.MODEL_UNKNOWN,
    ErrorCode.MODEL_RETIRED,
    ErrorCode.UNTRUSTED_ARTIFACT,
)


@dataclass
class Dispatcher:
    books: tasking.Books
    config: AppliedConfig
    pools: PoolsView
    sessions: sessions.SessionStore
    clock: clocks.Clock
    wake: Callable[[], None]  # wake the loop (a slot was freed)
    rates: rates.Rates = field(default_factory=rates.Rates)
    # models whose file failed its digest check → why (cataloging.Catalog.blocked)
    blocked: Callable[[], Mapping[str, str]] = field(default=lambda: {})
    # each placement decision the pump makes for a queued task (the metrics count them)
    placed: Callable[[str, placement.Decision], None] = field(default=lambda _t, _d: None)
    queue: queues.TaskQueue = field(init=False)
    runs: dict[ids.TaskId, tasking.TaskRun] = field(default_factory=dict)
    running: dict[ids.TaskId, streaming.Running] = field(default_factory=dict)
    # admitted, their `queued` frame not yet written (`announce`, once per batch)
    unannounced: list[queues.Entry] = field(default_factory=list)
    # recovered tasks still queued: accepted before a restart, never evicted by drop-lru
    owed: set[str] = field(default_factory=set)
    # when the clients a full queue turned away were told to come back (monotonic s): each
    # is given the next place to free after those promised already (`admitting`)
    promised: list[float] = field(default_factory=list)
    # the daemon is stopping: a task's end starts nothing more (running ones drain)
    stopping: bool = False
    # the pools' limits (state, ctx, max_tokens) every queued task was last checked against
    _limits_checked: tuple[Any, ...] | None = field(default=None, init=False, repr=False)
    # the (pool, model) pairs of orch.yaml queued tasks were last bound to (`_follow_pools`)
    _served_seen: tuple[tuple[tuple[str, str], ...], frozenset[str]] | None = field(
        default=None, init=False, repr=False
    )
    _pass_timer: asyncio.TimerHandle | None = field(default=None, init=False, repr=False)
    _probes: set[asyncio.Task[None]] = field(default_factory=set, init=False, repr=False)
    _end_pass_at: float = field(default=float("-inf"), init=False, repr=False)

    def __post_init__(self) -> None:
        self.queue = queues.TaskQueue(1, "reject")
        self.sync_queue_config()

    def sync_queue_config(self) -> None:
        """Follow a newly applied config: the rates' priors, and the queue when its capacity
        or policy changed (queued entries are kept)."""
        state = self.config.state
        if state is None:
            return
        self.rates.configure(state)
        cfg = state.queue
        if cfg.capacity == self.queue.capacity and cfg.full_policy == self.queue.full_policy:
            return
        old = list(self.queue.in_dispatch_order())
        self.queue = queues.TaskQueue(max(cfg.capacity, len(old)), cfg.full_policy)
        for entry in old:
            self.queue.push(entry)
        self.queue.capacity = cfg.capacity

    # -- admission and sessions -----------------------------------------------------------

    def admit(self, run: tasking.TaskRun, *, recovered: bool = False) -> None:
        """Check guardrails, then queue the task (or write its rejection): `admitting`."""
        try:
            with atomic.unit(run.task_id):  # its session turn fails or stands with its result
                admitting.admit(self, run, recovered=recovered)
        except BaseException:
            # nothing half-admitted may keep the task id reserved or sit in the queue
            if self.runs.get(run.task_id) is run:
                del self.runs[run.task_id]
                if run.task_id in self.queue:
                    self.queue.remove(ids.TaskId(run.task_id))
            raise

    def cancel_taken(self, run: tasking.TaskRun, *, orphaned: bool = False) -> None:
        """A task taken while a cancel request for it waits in spool/cancel/: it ends
        canceled at once, before any admission check (a full queue, or a pool gone since,
        must not turn a cancel the user asked for, or a daemon acknowledged before a
        restart, into a rejection). The next pass consumes the request (`cancelling`).
        `orphaned`: instead, a task of an OpenAI-compatible request the daemon before this
        one took, whose client's connection ended with it (`taking.Taker._orphaned`)."""
        if orphaned:
            logs.emit(
                log,
                "task.orphaned",
                f"Canceled task {run.task_id}: it answered an OpenAI-compatible request whose "
                "connection ended with the daemon that took it, so nobody can receive it "
                "(the client sends it again).",
                **run.log_ids,
            )
        else:
            logs.emit(log, "task.cancel", f"Cancel of task {run.task_id} requested.", **run.log_ids)
        run.cancel_requested = True
        self.books.finish(run, "canceled", finish_reason="canceled")  # as the task's unit

    def announce(self) -> list[tuple[tasking.TaskRun, Exception]]:
        """Write the `queued` frames of the batch just admitted: `admitting.announce`."""
        return admitting.announce(self)

    def sweep_sessions(self) -> None:
        """Evict sessions past their TTL so the next request names the limit it hit."""
        state = self.config.state
        if state is None:
            return
        ttl_s = state.sessions.ttl_s
        in_use = {run.task.session_id for run in self.runs.values() if run.task.session_id}
        for session in sessions.sweep(
            self.sessions, ttl_s=ttl_s, now=self.clock.now(), in_use=in_use
        ):
            logs.emit(
                log,
                "session.evicted",
                f"Evicted session {session.session_id}: no use for {ttl_s:.0f} s.",
                session_id=session.session_id,
            )

    # -- dispatch -------------------------------------------------------------------------

    def pump(self, *, recheck: bool = True) -> None:
        """Place queued tasks onto free replicas; expire deadlines; fail unservable tasks
        (unless not `recheck`: a task's end changes no target's servability)."""
        # a task starts only after its `queued` frame (the daemon announces after intake)
        for run, exc in self.announce():
            log.error("could not write the queued result of %s: %s", run.task_id, exc)
        self._expire_queued()
        if recheck:
            self._fail_unservable()
        decisions: dict[str, placement.Decision] = {}
        while True:
            decisions.clear()
            candidates = self.pools.candidates()
            free_models = {c.model_id for c in candidates if c.feasible}

            def placeable(
                entry: queues.Entry,
                free_models: set[ids.ModelId] = free_models,
                candidates: list[placement.Candidate] = candidates,
            ) -> bool:
                if entry.model_id not in free_models:  # cheap skip: nothing free for it
                    return False
                decision = placement.choose(self._want(entry), candidates)
                decisions[entry.task_id] = decision
                if decision.outcome != "assigned":
                    self.placed(entry.task_id, decision)
                return decision.outcome == "assigned"

            entry = self.queue.pop_first(placeable, models=free_models)
            if entry is None:
                return
            decision = decisions[entry.task_id]
            self.placed(entry.task_id, decision)
            logs.emit(
                log,
                "placement.decided",
                f"Placed task {entry.task_id} on {decision.replica_id}.",
                **self.runs[entry.task_id].log_ids,
                decision=decision.log_fields(),
            )
            self._start(self.runs[entry.task_id], decision)

    def _want(self, entry: queues.Entry) -> placement.Want:
        run = self.runs[entry.task_id]
        last = None
        if run.task.session_id:
            session = self.sessions.get(run.task.session_id)
            last = session.last_replica_id if session else None
        want = placement.Want.of(
            entry.task_id,
            run.task,
            last_replica_id=ids.ReplicaId(last) if last else None,
            # estimated once, when the entry was made (`admitting.entry_of`)
            context_tokens=(
                entry.route.context_tokens
                if entry.route is not None
                else admission.context_tokens(run.task)
            ),
        )
        # the task may name only a pool: admission resolved its model
        return dataclasses.replace(want, model_id=entry.model_id)

    def _expire_queued(self) -> None:
        for entry in self.queue.take_expired(self.clock.monotonic()):
            run = self.runs.pop(entry.task_id)
            self.books.finish(
                run,
                "failed",
                error=errors.envelope(
                    ErrorCode.DEADLINE_UNMET,
                    f"deadline_ms: {run.task.deadline_ms} passed while the task was queued",
                ),
            )

    def reload_touches(self, model_id: str, pool_id: str | None) -> bool:
        """Whether a task for `model_id` (and `pool_id`) waits on a reload's outcome: it names
        a pool being reloaded, or its model is what such a pool served before or serves now.
        A reload edits orch.yaml and puts it back when it fails: such tasks are neither
        refused nor failed for the edit until the outcome is known (they run on the old
        spec after a failed reload)."""
        reloading = self.pools.reloading
        if not reloading:
            return False
        if pool_id is not None and pool_id in reloading:
            return True
        state = self.config.state
        now = {p.id: p.model for p in state.pools} if state is not None else {}
        return any(model_id in (before, now.get(p)) for p, before in reloading.items())

    def _fail_unservable(self) -> None:
        state = self.config.state
        if state is None:
            return
        self._follow_pools(state)
        views = self.pools.views()
        blocked = self.blocked()
        # The codes that fail a queued task depend only on its target (model, pool and pin:
        # `admitting` sets it), so one check of the first task of each target serves all.
        for first in self.queue.targets():
            if self.reload_touches(first.model_id, first.pool_id):
                continue  # checked once the reload's outcome is known
            run = self.runs[first.task_id]
            target = admission.Target(first.model_id, first.pool_id)
            found = admission.check(run.task, target, state=state, pools=views, blocked=blocked)
            if found is None or found.code not in _TARGET_CODES:
                continue
            # a model gone or Retired, a pool the task names gone or scaled to zero, can
            # only be an edit of orch.yaml (a pool can also be drained over the API, a model
            # blocked by its verification)
            serving = _pools_of(run.task, first, state)
            edited = found.code in (ErrorCode.MODEL_UNKNOWN, ErrorCode.MODEL_RETIRED) or (
                found.code is ErrorCode.POOL_UNAVAILABLE and all(p.replicas == 0 for p in serving)
            )
            for entry in self.queue.of_target(first.target):
                self._fail_queued(entry, found, changed=edited)
        # The rest depend on each task (its prompt and max_tokens against the pools' ctx and
        # max_tokens): checked again whenever those limits change, so a task that no longer
        # fits (ctx lowered while it waited) fails saying why instead of waiting for ever
        limits = tuple(sorted((v.pool_id, v.state, v.ctx, v.max_tokens) for v in views.values()))
        if limits == self._limits_checked:
            return
        # checked again once a reload ends (its tasks were skipped meanwhile)
        self._limits_checked = None if self.pools.reloading else limits
        for entry in self.queue.in_dispatch_order():
            if self.reload_touches(entry.model_id, entry.pool_id):
                continue
            target = admission.Target(entry.model_id, entry.pool_id)
            run = self.runs[entry.task_id]
            found = admission.check(run.task, target, state=state, pools=views, blocked=blocked)
            if found is not None and found.code is ErrorCode.INVALID_PARAMS:
                self._fail_queued(entry, found, changed=True)

    def _follow_pools(self, state: desired.DesiredState) -> None:
        """A queued task that named only its pool runs whatever model the pool serves: when
        an edit (a reload) gives the pool another model, the task follows it, keeping its
        place, instead of failing for the model it was bound to at admission. Not while the
        pool's own reload is under way (it goes back to its old model if the reload fails);
        the pools of other reloads, or of none, are followed meanwhile."""
        reloading = frozenset(self.pools.reloading)
        served = tuple((p.id, p.model) for p in state.pools if p.id not in reloading)
        if (served, reloading) == self._served_seen:
            return
        self._served_seen = (served, reloading)
        models = dict(served)
        for entry in self.queue.in_dispatch_order():
            run = self.runs[entry.task_id]
            model = models.get(entry.pool_id or "")
            if run.task.model is not None or model is None or model == run.model_id:
                continue
            run.model_id = ids.ModelId(model)
            run.result.model = model
            run.result.model_digest = state.models[model].digest if model in state.models else None
            self.queue.replace(admitting.entry_of(run))
            logs.emit(
                log,
                "task.retargeted",
                f"Task {run.task_id} names only pool {entry.pool_id}, which now serves model "
                f"{model} (it served {entry.model_id}): the task will run on {model}.",
                **run.log_ids,
            )

    def _fail_queued(
        self, entry: queues.Entry, error: errors.ErrorEnvelope, *, changed: bool = False
    ) -> None:
        """Fail a queued task that orch.yaml's pools can no longer serve."""
        if changed:
            error = error.model_copy(
                update={"message": error.message + " (orch.yaml changed while the task waited)"}
            )
        self.queue.remove(entry.task_id)
        self.books.finish(self.runs.pop(entry.task_id), "failed", error=error)

    def _start(self, run: tasking.TaskRun, decision: placement.Decision) -> None:
        assert decision.replica_id is not None and decision.pool_id is not None
        state = self.config.state
        pool = state.pool(decision.pool_id) if state is not None else None
        limit = pool.max_tokens if pool is not None else None
        if limit is not None and limit < run.task.max_tokens and tasks.up_to_context(run.task):
            # a ceiling (OpenAI's default: up to the largest pool's room) runs within the
            # limit of the pool it landed on, as placement holds other tasks to it
            run.task = run.task.model_copy(update={"max_tokens": limit})
        lease = self.pools.lease(decision.replica_id)
        running = streaming.Running(
            run,
            lease,
            decision.pool_id,
            self.clock.monotonic(),
            self.rates.service_ms(decision.pool_id, run.task.max_tokens),
            generation=self.rates.generation(decision.pool_id),
        )
        self.running[run.task_id] = running
        job = streaming.stream(
            running,
            decision,
            deps=self._stream_deps,
            gpu=self.pools.gpu_ref(decision.replica_id),
            engine_version=self.pools.engine_version(decision.replica_id),
            idle_s=state.timeouts.decode_idle_s if state else 60.0,
        )
        running.job = asyncio.get_running_loop().create_task(job, name=f"task:{run.task_id}")
        running.job.add_done_callback(functools.partial(self._reaped, run.task_id))

    @property
    def _stream_deps(self) -> streaming.Deps:
        return streaming.Deps(
            books=self.books,
            rates=self.rates,
            clock=self.clock,
            queue_depth=lambda: len(self.queue),
            ended=self._ended,
        )

    def _ended(self, running: streaming.Running) -> None:
        """A task's terminal frame and result are written: free its slot and its id."""
        run = running.run
        self.running.pop(run.task_id, None)
        self.runs.pop(run.task_id, None)
        self.pools.release(running.lease)
        if run.task.session_id is not None:
            # joins the task's pending commit, as its unit: durable after its result
            with atomic.group(), atomic.unit(run.task_id):
                sessions.touch(
                    self.sessions,
                    run.task.session_id,
                    run.task_id,
                    now=self.clock.now(),
                    replica_id=running.replica_id,
                    tokens_out=run.result.tokens_out,
                )
        error = run.result.error
        if running.hung and error is not None:
            self.pools.stalled(running.replica_id, f"hung: {error.message} mid-stream")
        elif error is not None and error.code is ErrorCode.DECODE_TIMEOUT:
            self._probe_stalled(running)
        if run.result.status not in ("succeeded", "canceled") or self.stopping:
            self.wake()  # a failure: the pass looks at the replicas before anything is placed
            return
        try:
            self.pump(recheck=False)  # the replica just served well: its slot is taken now
        except Exception:  # the ended task is written; the pass places what this could not
            log.exception("placing after %s ended failed", run.task_id)
            self.wake()
            return
        self._pass_soon()

    def _probe_stalled(self, running: streaming.Running) -> None:
        """A task got no first token within decode_idle_s: a long prefill, or an engine that
        hangs (frozen, stuck in the driver) and would fail every task placed on it the same
        way. Its health endpoint tells them apart: an engine that answers it at all is busy,
        not hung; one that does not within HUNG_PROBE_S is handled as hung (`stalled`)."""
        handle, replica_id = running.lease.handle, running.replica_id

        async def probe() -> None:
            try:
                health = await asyncio.wait_for(
                    llama_server.Client(handle.base_url).health(), HUNG_PROBE_S
                )
                answered = health.status is not None
            except Exception:  # TimeoutError: no answer
                answered = False
            if not answered:
                self.pools.stalled(
                    replica_id,
                    f"hung: no first token within decode_idle_s, and no answer to a health "
                    f"check within {HUNG_PROBE_S:g} s",
                )

        job = asyncio.get_running_loop().create_task(probe(), name=f"probe:{replica_id}")
        self._probes.add(job)
        job.add_done_callback(self._probes.discard)

    def _pass_soon(self) -> None:
        """Wake the loop for a full pass: now, or PASS_AFTER_END_S after the last one a task's
        end asked for, once for all the ends in between."""
        if self._pass_timer is not None:
            return
        loop = asyncio.get_running_loop()

        def due() -> None:
            self._pass_timer = None
            self._end_pass_at = loop.time()
            self.wake()

        wait = self._end_pass_at + PASS_AFTER_END_S - loop.time()
        if wait <= 0:
            due()
        else:
            self._pass_timer = loop.call_later(wait, due)

    def _reaped(self, task_id: ids.TaskId, job: asyncio.Task[None]) -> None:
        """The safety net when a task's coroutine ends: free the slot of a task that ended
        without a terminal write, and finish it unless the daemon is shutting down."""
        failure = None if job.cancelled() else job.exception()
        if isinstance(failure, OSError):  # the disk refused a write (full, gone): said plainly
            logs.emit(
                log,
                "task.write_failed",
                f"Task {task_id} stopped: a write of its files failed: "
                f"{failure.strerror or failure} ({failure.filename or 'no file named'}).",
                level=40,
                task_id=task_id,
            )
        elif failure is not None:
            log.error("task coroutine of %s failed", task_id, exc_info=failure)
        running = self.running.get(task_id)
        if running is None or running.job is not job:
            return  # finished normally
        self.running.pop(task_id)
        self.pools.release(running.lease)
        run = running.run
        if run.cancel_requested:  # cancelled before its coroutine ever ran
            self.runs.pop(task_id, None)
            self.books.finish(run, "canceled", finish_reason="canceled")
        elif not job.cancelled():
            self.runs.pop(task_id, None)
            self.books.finish(
                run,
                "failed",
                error=errors.envelope(
                    ErrorCode.INTERNAL, "the task's stream ended without a terminal state"
                ),
            )
        self.wake()

    # -- cancel and shutdown ----------------------------------------------------------------

    def cancel(self, task_id: ids.TaskId) -> bool:
        """Cancel a queued or running task; True when it was live here (idempotent)."""
        if task_id in self.queue:
            self.queue.remove(task_id)
            run = self.runs.pop(task_id)
            run.cancel_requested = True
            self.books.finish(run, "canceled", finish_reason="canceled")
            return True
        running = self.running.get(task_id)
        if running is not None and running.job is not None:
            if not running.run.cancel_requested:  # cancel once: the stream is finishing
                running.run.cancel_requested = True
                running.job.cancel()
            return True
        return False

    async def shutdown(
        self,
        *,
        drain_s: float = 0.0,
        hurry: asyncio.Event | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Let running tasks finish for up to `drain_s` (or until `hurry` is set), then cancel
        the rest without a terminal write: they stay resumable and re-run at the next start.
        `tick` is called every DRAIN_TICK_S meanwhile (the daemon applies cancel requests:
        a task cancelled while the daemon drains is cancelled, not run to its end)."""
        self.stopping = True
        if self._pass_timer is not None:
            self._pass_timer.cancel()
            self._pass_timer = None
        jobs = {r.job for r in self.running.values() if r.job is not None}
        if jobs and drain_s > 0:
            waits: set[asyncio.Future[Any]] = set(jobs)
            hurried = asyncio.ensure_future(hurry.wait()) if hurry is not None else None
            if hurried is not None:
                waits.add(hurried)
            end = self.clock.monotonic() + drain_s
            while jobs and (hurried is None or not hurried.done()):
                left = end - self.clock.monotonic()
                if left <= 0:
                    break
                timeout = left if tick is None else min(left, DRAIN_TICK_S)
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if tick is not None:
                    tick()
                jobs = {job for job in jobs if not job.done()}
                waits = {w for w in waits if not w.done()}
            if hurried is not None:
                hurried.cancel()
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        for run in self.runs.values():  # left resumable: their logs are reopened on restart
            run.log.close()

    def queue_row(self) -> statusfile.QueueRow:
        return statusfile.QueueRow(
            depth=len(self.queue),
            by_priority=dict(self.queue.depth_by_priority()),
            capacity=self.queue.capacity,
            full_policy=self.queue.full_policy,
            running=len(self.running),
        )


def _pools_of(
    task: tasks.TaskFile, entry: queues.Entry, state: desired.DesiredState
) -> list[desired.PoolSpec]:
    """The pools of orch.yaml a queued task may run on: the one it names or is pinned to,
    else its model's, less those its prefer/avoid lists exclude without a fallback."""
    placement = task.placement
    named = entry.pool_id or (placement.pin_pool if placement.mode == "pin" else None)
    if named:
        return [p for p in state.pools if p.id == named]
    found = [p for p in state.pools if p.model == entry.model_id]
    if not placement.allow_fallback:
        left = placement.leaves(p.id for p in found)
        found = [p for p in found if p.id in left]
    return found
