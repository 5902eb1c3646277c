"""Admitted tasks: queueing, placement onto Ready replicas, streaming, cancel and deadlines.

The daemon calls `admit` for each parsed task, `cancel` for each cancel request and `pump` on
every pass; `pump` starts one coroutine per task it places. All frames and results are written
through `tasking.Books`, so the event log, the result file and the spool always agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from plugins import interfaces
from reconciler import (
    admission,
    clocks,
    estimates,
    failpoints,
    logs,
    placement,
    pools,
    queues,
    tasking,
)
from reconciler.configuring import AppliedConfig
from state import errors, events, ids, results, sessions
from state.errors import ErrorCode, ErrorEnvelope

log = logs.get("dispatch")

METRICS_EVERY_S = 1.0


class PoolsView(Protocol):
    """What dispatch needs from the pool runtime (reconciler.pools.PoolRuntime)."""

    def views(self) -> dict[str, admission.PoolView]: ...

    def candidates(self) -> list[placement.Candidate]: ...

    def lease(self, replica_id: str) -> pools.Lease: ...

    def release(self, lease: pools.Lease) -> None: ...

    def gpu_ref(self, replica_id: str | None) -> results.GpuRef | None: ...

    def rate(self, pool_id: str) -> estimates.ServiceRate: ...

    def observe(
        self, pool_id: str, *, tokens: int, decode_ms: float, first_token_ms: float
    ) -> None: ...

    def startup_ms(self, pool_id: str) -> float: ...

    def engine_version(self, replica_id: str | None) -> str | None: ...


@dataclass
class Running:
    run: tasking.TaskRun
    replica_id: str
    pool_id: str
    started_mono: float
    service_ms: float
    lease: pools.Lease
    job: asyncio.Task[None] | None = None
    tokens_out: int = 0


@dataclass
class Dispatcher:
    books: tasking.Books
    config: AppliedConfig
    pools: PoolsView
    sessions: sessions.SessionStore
    clock: clocks.Clock
    wake: Any  # callable: wake the loop (a slot was freed)
    queue: queues.TaskQueue = field(init=False)
    runs: dict[str, tasking.TaskRun] = field(default_factory=dict)
    running: dict[str, Running] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.queue = queues.TaskQueue(1, "reject")
        self.sync_queue_config()

    def sync_queue_config(self) -> None:
        """Rebuild the queue when capacity or policy changed; queued entries are kept."""
        state = self.config.state
        if state is None:
            return
        cfg = state.queue
        if cfg.capacity == self.queue.capacity and cfg.full_policy == self.queue.full_policy:
            return
        old = list(self.queue.in_dispatch_order())
        self.queue = queues.TaskQueue(max(cfg.capacity, len(old)), cfg.full_policy)
        for entry in old:
            self.queue.push(entry)
        self.queue.capacity = cfg.capacity

    # -- admission ------------------------------------------------------------------------

    def admit(self, run: tasking.TaskRun, *, recovered: bool = False) -> None:
        """Check guardrails, then queue the task (or write its rejection)."""
        try:
            self._admit(run, recovered=recovered)
        except BaseException:
            # nothing half-admitted may keep the task id reserved or sit in the queue
            if self.runs.get(run.task_id) is run:
                del self.runs[run.task_id]
                if run.task_id in self.queue:
                    self.queue.remove(ids.TaskId(run.task_id))
            raise

    def _admit(self, run: tasking.TaskRun, *, recovered: bool) -> None:
        state = self.config.state
        assert state is not None
        self.runs[run.task_id] = run
        target = admission.resolve(run.task, state)
        if isinstance(target, ErrorEnvelope):
            return self._reject(run, target)
        run.model_id, run.pool_id = target.model_id, target.pool_id
        run.result.model = target.model_id
        run.result.model_digest = (
            state.models[target.model_id].digest if (target.model_id in state.models) else None
        )
        problem = admission.check(run.task, target, state=state, pools=self.pools.views())
        if problem is None and not recovered:
            problem = self._session_problem(run)
        entry = self._entry(run)
        if problem is None and not recovered:  # a recovered task was accepted already
            start, probability = self._estimate_new(entry)
            problem = admission.deadline_error(
                run.task, predicted_start_ms=start, probability=probability
            )
        if problem is not None:
            return self._reject(run, problem)
        outcome = self.queue.push(entry)
        if not outcome.accepted:
            return self._reject(
                run,
                errors.envelope(
                    ErrorCode.ADMISSION_REJECT,
                    f"the queue is full ({self.queue.capacity} tasks, policy reject)",
                    retry_after_ms=self._retry_after_ms(),
                    policy_label="reject",
                ),
            )
        if outcome.evicted is not None:
            self._evict(outcome.evicted)
        if not recovered:
            self._count_turn(run)
        position = self.queue.position(entry.task_id)
        start, probability = self._estimate_queued(entry)
        run.result.status = "queued"
        run.result.queue_position = position
        run.result.predicted_start_ms = _ms(start)
        run.result.on_time_probability = probability
        self.books.frame(
            run,
            "queued",
            {
                "queue_position": position,
                "predicted_start_ms": _ms(start),
                "on_time_probability": probability,
                "attempt": run.result.attempts,
            },
        )
        self.books.save(run)
        logs.emit(
            log,
            "task.queued",
            f"Queued task {run.task_id} for {run.model_id} at position {position}, "
            f"predicted start in {_ms(start)} ms.",
            task_id=run.task_id,
            queue_position=position,
            priority=run.priority,
        )

    def _entry(self, run: tasking.TaskRun) -> queues.Entry:
        return queues.Entry(
            task_id=ids.TaskId(run.task_id),
            priority=run.task.priority,
            model_id=ids.ModelId(run.model_id),
            pool_id=ids.PoolId(run.pool_id) if run.pool_id else None,
            enqueued_at=run.accepted_mono,
            max_tokens=run.task.max_tokens,
            deadline_at=run.deadline_mono,
            payload=run,
        )

    def _reject(self, run: tasking.TaskRun, error: ErrorEnvelope) -> None:
        self.runs.pop(run.task_id, None)
        self.books.finish(run, "rejected", error=error)

    def _evict(self, entry: queues.Entry) -> None:
        run = self.runs.pop(entry.task_id)
        self.books.finish(
            run,
            "failed",
            error=errors.envelope(
                ErrorCode.QUEUE_FULL_DROP_LRU,
                "dropped from the full queue to make room for newer work (policy drop-lru)",
                retry_after_ms=self._retry_after_ms(),
                policy_label="drop-lru",
            ),
        )

    def _retry_after_ms(self) -> int:
        """About how long until a queue place frees: the soonest running task's end."""
        now = self.clock.monotonic()
        remaining = [
            max(0.0, r.service_ms - (now - r.started_mono) * 1000) for r in self.running.values()
        ]
        return max(250, int(min(remaining, default=1000)))

    # -- sessions -------------------------------------------------------------------------

    def _session_problem(self, run: tasking.TaskRun) -> ErrorEnvelope | None:
        sid = run.task.session_id
        state = self.config.state
        if sid is None or state is None:
            return None
        session = self.sessions.get(sid)
        if session is None:
            return None
        cfg = state.sessions
        now = self.clock.now()
        reason = sessions.limit_reached(
            session,
            now=now,
            ttl_s=cfg.ttl_s,
            max_turns=cfg.max_turns,
            token_budget=cfg.token_budget,
        )
        if reason is None:
            return None
        if not session.evicted:
            self.sessions.put(sessions.evict(session, reason, now=now))
        code, text = {
            "expired": (
                ErrorCode.SESSION_EXPIRED,
                f"session {sid!r} expired after {cfg.ttl_s:.0f} s without use",
            ),
            "turns": (
                ErrorCode.SESSION_TURNS_EXCEEDED,
                f"session {sid!r} reached its limit of {cfg.max_turns} turns",
            ),
            "budget": (
                ErrorCode.SESSION_BUDGET_EXCEEDED,
                f"session {sid!r} spent its budget of {cfg.token_budget} tokens",
            ),
        }[reason]
        return errors.envelope(code, text)

    def _count_turn(self, run: tasking.TaskRun) -> None:
        sid = run.task.session_id
        if sid is None:
            return
        now = self.clock.now()
        session = self.sessions.get(sid) or sessions.Session(
            session_id=sid, created_at=now, last_used_at=now
        )
        self.sessions.put(
            session.model_copy(update={"turns": session.turns + 1, "last_used_at": now})
        )

    def sweep_sessions(self) -> None:
        """Evict sessions past their TTL so the next request names the limit it hit."""
        state = self.config.state
        if state is None:
            return
        now = self.clock.now()
        for session in self.sessions.all():
            if session.evicted is None and now - session.last_used_at > state.sessions.ttl_s:
                self.sessions.put(sessions.evict(session, "expired", now=now))
                logs.emit(
                    log,
                    "session.evicted",
                    f"Evicted session {session.session_id}: no use for "
                    f"{state.sessions.ttl_s:.0f} s.",
                    session_id=session.session_id,
                )

    # -- estimates ------------------------------------------------------------------------

    def _slots_for(self, entry: queues.Entry) -> tuple[list[float], str | None]:
        """When each slot that could serve `entry` frees (ms from now), and a pool for rates."""
        now = self.clock.monotonic()
        frees: list[float] = []
        pool_for_rate: str | None = None
        busy: dict[str, list[float]] = {}
        for r in self.running.values():
            left = max(0.0, r.service_ms - (now - r.started_mono) * 1000)
            busy.setdefault(r.replica_id, []).append(left)
        for cand in self.pools.candidates():
            if cand.model_id != entry.model_id or (entry.pool_id and cand.pool_id != entry.pool_id):
                continue
            pool_for_rate = pool_for_rate or cand.pool_id
            lefts = sorted(busy.get(cand.replica_id, []))
            start_ms = 0.0 if cand.state == "Ready" else self.pools.startup_ms(cand.pool_id)
            for slot in range(cand.slots_total):
                frees.append(start_ms + (lefts[slot] if slot < len(lefts) else 0.0))
        return frees, pool_for_rate

    def _service_ms(self, pool_id: str | None, max_tokens: int) -> float:
        rate = self.pools.rate(pool_id) if pool_id else estimates.prior()
        return estimates.service_ms(max_tokens, rate)

    def _estimate(
        self, entry: queues.Entry, ahead: tuple[queues.Entry, ...]
    ) -> tuple[float | None, float | None]:
        frees, pool_id = self._slots_for(entry)
        rate = self.pools.rate(pool_id) if pool_id else estimates.prior()
        start = estimates.predicted_start_ms(
            frees,
            [
                estimates.service_ms(e.max_tokens, rate)
                for e in ahead
                if e.model_id == entry.model_id
            ],
        )
        if entry.deadline_at is None:
            return start, None
        deadline_in = (entry.deadline_at - self.clock.monotonic()) * 1000
        if start is None:  # no replica to estimate from yet: unknown, which is not "late"
            return None, None
        return start, estimates.on_time_probability(
            start, self._service_ms(pool_id, entry.max_tokens), deadline_in
        )

    def _estimate_new(self, entry: queues.Entry) -> tuple[float | None, float | None]:
        ahead = tuple(
            e
            for e in self.queue.in_dispatch_order()
            if e.priority == "interactive" or entry.priority == "batch"
        )
        return self._estimate(entry, ahead)

    def _estimate_queued(self, entry: queues.Entry) -> tuple[float | None, float | None]:
        return self._estimate(entry, self.queue.ahead_of(entry.task_id))

    # -- dispatch -------------------------------------------------------------------------

    def pump(self) -> None:
        """Place queued tasks onto free replicas; expire deadlines; fail unservable tasks."""
        self._expire_queued()
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
                return decision.outcome == "assigned"

            entry = self.queue.pop_first(placeable)
            if entry is None:
                return
            decision = decisions[entry.task_id]
            logs.emit(
                log,
                "placement.decided",
                f"Placed task {entry.task_id} on {decision.replica_id}.",
                task_id=entry.task_id,
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
            context_tokens=admission.context_tokens(run.task),
        )
        # the task may name only a pool: admission resolved its model
        return dataclasses.replace(want, model_id=entry.model_id)

    def _expire_queued(self) -> None:
        now = self.clock.monotonic()
        for entry in self.queue.in_dispatch_order():
            if entry.deadline_at is not None and now >= entry.deadline_at:
                self.queue.remove(entry.task_id)
                run = self.runs.pop(entry.task_id)
                self.books.finish(
                    run,
                    "failed",
                    error=errors.envelope(
                        ErrorCode.DEADLINE_UNMET,
                        f"deadline_ms: {run.task.deadline_ms} passed while the task was queued",
                    ),
                )

    def _fail_unservable(self) -> None:
        state = self.config.state
        if state is None:
            return
        views = self.pools.views()
        # The codes that fail a queued task depend only on its model, pool and pin, so one
        # check per distinct target serves every task queued for it.
        verdicts: dict[tuple[str, str | None, str | None], ErrorEnvelope | None] = {}
        for entry in self.queue.in_dispatch_order():
            run = self.runs[entry.task_id]
            p = run.task.placement
            key = (entry.model_id, entry.pool_id, p.pin_pool if p.mode == "pin" else None)
            if key not in verdicts:
                target = admission.Target(entry.model_id, entry.pool_id)
                found = admission.check(run.task, target, state=state, pools=views)
                unservable = found is not None and found.code in (
                    ErrorCode.POOL_UNAVAILABLE,
                    ErrorCode.MODEL_UNKNOWN,
                    ErrorCode.MODEL_RETIRED,
                )
                verdicts[key] = found if unservable else None
            problem = verdicts[key]
            if problem is not None:
                self.queue.remove(entry.task_id)
                self.runs.pop(entry.task_id)
                self.books.finish(run, "failed", error=problem)

    def _start(self, run: tasking.TaskRun, decision: placement.Decision) -> None:
        assert decision.replica_id is not None and decision.pool_id is not None
        lease = self.pools.lease(decision.replica_id)
        engine, handle = lease.engine, lease.handle
        service = self._service_ms(decision.pool_id, run.task.max_tokens)
        running = Running(
            run, decision.replica_id, decision.pool_id, self.clock.monotonic(), service, lease
        )
        self.running[run.task_id] = running
        running.job = asyncio.get_running_loop().create_task(
            self._stream(running, engine, handle, decision), name=f"task:{run.task_id}"
        )
        running.job.add_done_callback(functools.partial(self._reaped, run.task_id))

    async def _stream(
        self,
        running: Running,
        engine: interfaces.Engine,
        handle: interfaces.ReplicaHandle,
        decision: placement.Decision,
    ) -> None:
        """Run one task on its leased slot. Every ending writes the terminal frame and result
        first (in this coroutine, so no token can follow it) and only then closes the engine
        stream, so a second cancel during the close cannot leave the task unfinished."""
        run = running.run
        stream: AsyncIterator[interfaces.Token | interfaces.Done] | None = None
        pending: asyncio.Future[interfaces.Token | interfaces.Done] | None = None
        idle_s = self.config.state.timeouts.decode_idle_s if self.config.state else 60.0
        try:
            self._begin(running, handle, decision)
            request = interfaces.GenerateRequest(
                task_id=run.task_id,
                prompt=run.task.prompt,
                max_tokens=run.task.max_tokens,
                seed=run.result.seed or 0,
                temperature=run.task.sampling.temperature,
                top_p=run.task.sampling.top_p,
                top_k=run.task.sampling.top_k,
            )
            stream = engine.generate(handle, request)
            iterator = stream.__aiter__()
            begun = last_token = last_metrics = self.clock.monotonic()
            first_token_at: float | None = None
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(iterator.__anext__())
                now = self.clock.monotonic()
                wait_s = min(idle_s - (now - last_token), METRICS_EVERY_S - (now - last_metrics))
                if run.deadline_mono is not None:
                    wait_s = min(wait_s, run.deadline_mono - now)
                # asyncio.wait, not wait_for: the pending read survives a timeout (so metrics
                # can be sent between slow tokens), and a cancel is never swallowed
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, wait_s))
                now = self.clock.monotonic()
                if not done:
                    if run.deadline_mono is not None and now >= run.deadline_mono:
                        raise _Deadline()
                    if now - last_token >= idle_s:
                        raise _Stalled()
                    if now - last_metrics >= METRICS_EVERY_S:
                        last_metrics = now
                        self._metrics(running)
                    continue
                finished, pending = pending, None
                try:
                    item = finished.result()
                except StopAsyncIteration:
                    raise interfaces.EngineStreamError(
                        "the stream ended without a final frame"
                    ) from None
                last_token = now
                if isinstance(item, interfaces.Done):
                    self._succeed(running, item, begun=begun, first_token_at=first_token_at)
                    return
                if first_token_at is None:
                    first_token_at = now
                    run.result.timings.first_token_ms = int((now - begun) * 1000)
                self._token(running, item)
                if now - last_metrics >= METRICS_EVERY_S:
                    last_metrics = now
                    self._metrics(running)
        except asyncio.CancelledError:
            if not run.cancel_requested:
                raise  # daemon shutdown: leave the task non-terminal; recovery re-runs it
            self._done(running, "canceled", finish_reason="canceled")
        except _Deadline:
            self._fail(
                running,
                ErrorCode.DEADLINE_UNMET,
                f"deadline_ms: {run.task.deadline_ms} passed after {run.result.tokens_out} tokens",
            )
        except _Stalled:
            self._fail(
                running,
                ErrorCode.DECODE_TIMEOUT,
                f"the engine sent no token for {idle_s:.0f} s",
                retry_after_ms=1000,
            )
        except (interfaces.EngineStreamError, OSError) as exc:
            code, retry_after_ms, hint = engine_failure(exc)
            self._done(
                running,
                "failed",
                error=errors.envelope(
                    code,
                    f"replica {running.replica_id} failed the task after "
                    f"{run.result.tokens_out} tokens: {exc}",
                    retry_after_ms=retry_after_ms,
                    hint=hint,
                ),
            )
        except Exception as exc:  # a bug: report it on the task rather than kill the daemon
            log.exception("unexpected error while streaming %s", run.task_id)
            self._fail(running, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if pending is not None:
                pending.cancel()
            if stream is not None:
                with contextlib.suppress(BaseException):  # closing drops the engine request
                    await asyncio.shield(_aclose(stream))

    def _begin(
        self, running: Running, handle: interfaces.ReplicaHandle, decision: placement.Decision
    ) -> None:
        run, result = running.run, running.run.result
        result.status = "running"
        result.attempts += 1
        result.pool_id, result.replica_id = decision.pool_id, decision.replica_id
        result.gpu = self.pools.gpu_ref(decision.replica_id)
        result.engine = handle.spec.engine
        result.engine_version = self.pools.engine_version(decision.replica_id)
        result.kv_warmth = decision.kv_warmth
        result.queue_position = 0
        result.timings.started_at = clocks.rfc3339(self.clock.now())
        result.timings.queue_ms = int((running.started_mono - run.accepted_mono) * 1000)
        result.text, result.tokens_out = "", 0
        self.books.frame(
            run,
            "started",
            {
                "queue_position": 0,
                "predicted_start_ms": 0,
                "pool_id": decision.pool_id,
                "replica_id": decision.replica_id,
                "gpu": result.gpu.model_dump(mode="json") if result.gpu else None,
                "kv_warmth": decision.kv_warmth,
                "attempt": result.attempts,
            },
        )
        self.books.save(run)
        failpoints.hit("after_started")
        self._metrics(running)

    def _token(self, running: Running, item: interfaces.Token) -> None:
        result = running.run.result
        self.books.frame(running.run, "token", {"t": item.text, "i": result.tokens_out})
        result.text += item.text
        result.tokens_out += 1
        running.tokens_out = result.tokens_out
        if result.tokens_out == 1:
            failpoints.hit("after_token")

    def _succeed(
        self, running: Running, item: interfaces.Done, *, begun: float, first_token_at: float | None
    ) -> None:
        result = running.run.result
        # the engine's count is authoritative: llama-server holds back pieces of a UTF-8
        # character, so some tokens arrive with no text of their own
        result.tokens_out = max(result.tokens_out, item.tokens_out)
        running.tokens_out = result.tokens_out
        decode_ms = (self.clock.monotonic() - (first_token_at or begun)) * 1000
        result.timings.decode_time_ms = int(decode_ms)
        self.pools.observe(
            running.pool_id,
            tokens=result.tokens_out,
            decode_ms=decode_ms,
            first_token_ms=float(result.timings.first_token_ms or 0),
        )
        self._metrics(running)
        self._done(running, "succeeded", finish_reason=item.finish_reason)

    def _fail(
        self, running: Running, code: ErrorCode, message: str, *, retry_after_ms: int | None = None
    ) -> None:
        self._done(
            running, "failed", error=errors.envelope(code, message, retry_after_ms=retry_after_ms)
        )

    def _reaped(self, task_id: str, job: asyncio.Task[None]) -> None:
        """The safety net when a task's coroutine ends: free the slot of a task that ended
        without a terminal write, and finish it unless the daemon is shutting down."""
        if not job.cancelled() and job.exception() is not None:
            log.error("task coroutine of %s failed", task_id, exc_info=job.exception())
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

    def _metrics(self, running: Running) -> None:
        run = running.run
        elapsed_ms = (self.clock.monotonic() - running.started_mono) * 1000
        rate = self.pools.rate(running.pool_id)
        left = max(0, run.task.max_tokens - running.tokens_out)
        probability = None
        if run.deadline_mono is not None:
            deadline_in = (run.deadline_mono - self.clock.monotonic()) * 1000
            probability = estimates.on_time_probability(
                0.0, left / rate.tokens_per_s * 1000, deadline_in
            )
        tokens_per_s = running.tokens_out / (elapsed_ms / 1000) if elapsed_ms > 0 else 0.0
        self.books.frame(
            run,
            "metrics",
            {
                "queue_depth": len(self.queue),
                "on_time_probability": probability,
                "tokens_out": running.tokens_out,
                "tokens_per_s": round(tokens_per_s, 2),
                "elapsed_ms": int(elapsed_ms),
            },
        )

    def _done(
        self,
        running: Running,
        status: results.StatusName,
        *,
        error: ErrorEnvelope | None = None,
        finish_reason: str | None = None,
    ) -> None:
        run = running.run
        self.running.pop(run.task_id, None)
        self.runs.pop(run.task_id, None)
        self.pools.release(running.lease)
        self.books.finish(run, status, error=error, finish_reason=finish_reason)
        self._touch_session(run, running.replica_id)
        self.wake()

    def _touch_session(self, run: tasking.TaskRun, replica_id: str) -> None:
        sid = run.task.session_id
        if sid is None:
            return
        session = self.sessions.get(sid)
        if session is None:
            return
        self.sessions.put(
            session.model_copy(
                update={
                    "last_used_at": self.clock.now(),
                    "last_replica_id": replica_id,
                    "tokens_out": session.tokens_out + run.result.tokens_out,
                }
            )
        )

    # -- cancel and shutdown ----------------------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        """Cancel a queued or running task; True when it was live here (idempotent)."""
        if task_id in self.queue:
            self.queue.remove(task_id)  # type: ignore[arg-type]
            run = self.runs.pop(task_id)
            run.cancel_requested = True
            self.books.finish(run, "canceled", finish_reason="canceled")
            return True
        running = self.running.get(task_id)
        if running is not None and running.job is not None:
            running.run.cancel_requested = True
            running.job.cancel()
            return True
        return False

    async def shutdown(self) -> None:
        jobs = [r.job for r in self.running.values() if r.job is not None]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    def depth(self) -> dict[str, Any]:
        by = self.queue.depth_by_priority()
        return {
            "depth": len(self.queue),
            "by_priority": dict(by),
            "capacity": self.queue.capacity,
            "full_policy": self.queue.full_policy,
            "running": len(self.running),
        }


def engine_failure(exc: BaseException) -> tuple[ErrorCode, int | None, str | None]:
    """What an engine failure means for the task: its code, retry delay and hint. The one
    table of engine failures; anything not named here is a bug (INTERNAL)."""
    if isinstance(exc, interfaces.EngineRefused) and exc.request_fault:
        return (
            ErrorCode.INVALID_PARAMS,
            None,
            "the engine refused the request: if it names the context, shorten the prompt, "
            "lower max_tokens or use a pool with a larger ctx",
        )
    if isinstance(exc, interfaces.EngineStreamError | OSError):
        return ErrorCode.WORKER_RESET, 1000, None
    return ErrorCode.INTERNAL, None, None


class _Deadline(Exception):
    pass


class _Stalled(Exception):
    pass


async def _aclose(stream: Any) -> None:
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        with contextlib.suppress(Exception):
            await closer()


def _ms(value: float | None) -> int | None:
    return None if value is None else round(value)


def frames_of(result: results.Result) -> list[events.EventFrame]:
    """The frames of a task's event log (for tests and `orchctl watch`)."""
    if result.events is None:
        return []
    from pathlib import Path

    return list(events.read(Path(result.events)))
