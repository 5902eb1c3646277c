"""Running one placed task on its leased slot: `started`, `token`, `metrics` and the terminal
frame, with cancel, deadline and stall enforced inside the one coroutine.

The dispatcher calls `stream(...)` once per placed task, as a background coroutine, passing
everything it needs. Every ending writes the terminal frame and result first (in this
coroutine, so no token can follow it), then calls `ended` (the dispatcher frees the slot and
updates the session), and only then closes the engine stream, so a second cancel during the
close cannot leave the task unfinished. A cancel of the coroutine without
`run.cancel_requested` is a daemon shutdown: the task is left non-terminal for recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from plugins import interfaces, llama_server
from reconciler import clocks, estimates, fleet, logs, placement, rates, tasking
from state import chats, errors, failpoints, ids, results, tasks
from state.errors import ErrorCode

log = logs.get("streaming")

METRICS_EVERY_S = 1.0
# our own writes failing (results/, the event log), never an engine's connection
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
DISK_HINT = (
    "The daemon could not write the task's files (a full disk, or a folder it may not "
    "write): free disk space or fix the folder's permissions, then submit again."
)
# a file or folder of the daemon's own that it may not write (permissions taken away, a
# folder where its file goes): as much the machine's fault as a full disk, when the error
# names a path of the daemon's, not the task file it was reading
ACCESS_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR})


def storage_failure(exc: BaseException, *, task_file: Path | None = None) -> bool:
    """Whether `exc` is the daemon failing to write its own files (a full disk, a folder it
    may not write), not something wrong with the task: the task is then left for the
    recovery pass to retry once the machine is fixed, never refused for it."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in DISK_ERRNOS or errors.exhausted(exc):
        return True
    if exc.errno not in ACCESS_ERRNOS or not exc.filename:
        return False
    named = {str(exc.filename), str(exc.filename2 or "")}
    return task_file is None or str(task_file) not in named


@dataclass
class Running:
    """A task on a slot, as the dispatcher tracks it."""

    run: tasking.TaskRun
    lease: fleet.Lease
    pool_id: ids.PoolId
    started_mono: float
    service_ms: float
    job: asyncio.Task[None] | None = None
    tokens_out: int = 0
    hung: bool = False  # its engine stopped sending tokens mid-stream (DECODE_TIMEOUT)
    generation: int | None = None  # its pool's speed generation when it began (`Rates`)

    @property
    def replica_id(self) -> ids.ReplicaId:
        return self.lease.replica_id


@dataclass(frozen=True)
class Deps:
    """What a stream writes to and reads from, passed explicitly by the dispatcher."""

    books: tasking.Books
    rates: rates.Rates
    clock: clocks.Clock
    queue_depth: Callable[[], int]
    ended: Callable[[Running], None]  # after the terminal write: free the slot, touch session


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
    if storage_failure(exc):  # not retriable as is: the machine must be fixed first
        return ErrorCode.INTERNAL, None, DISK_HINT
    if isinstance(exc, interfaces.ReplicaStopped):
        return (
            ErrorCode.WORKER_RESET,
            1000,
            "its replica was drained (scaled down, removed or changed in orch.yaml, or drained "
            "on request) before the task ended: submit it again; raise timeouts.drain_s to "
            "give running tasks longer",
        )
    if isinstance(exc, interfaces.EngineStreamError | OSError):
        return ErrorCode.WORKER_RESET, 1000, None
    return ErrorCode.INTERNAL, None, None


async def stream(
    running: Running,
    decision: placement.Decision,
    *,
    deps: Deps,
    gpu: results.GpuRef | None,
    engine_version: str | None,
    idle_s: float,
) -> None:
    run = running.run
    lease = running.lease
    reader: _Reader | None = None
    try:
        # the queued result (admitted in this pass, its commit pending) is on disk before the
        # started frame: a crash between them must not leave a started task with no result,
        # which the restart would run again as attempt 1
        await deps.books.settled(run.task_id)
        _begin(running, decision, deps=deps, gpu=gpu, engine_version=engine_version)
        # the engine is asked at once, while the running result commits; no token of it is
        # written or sent before that result is on disk (or, where the engine ends first,
        # before the commit that writes the task's end in its place)
        begun = deps.clock.monotonic()
        reader = _Reader(lease.engine.generate(lease.handle, _request(run)), deps.clock.monotonic)
        await _started(run, reader, deps)
        last_token = last_metrics = deps.clock.monotonic()
        first_token_at: float | None = None
        while True:
            items = reader.take()
            now = deps.clock.monotonic()
            if run.deadline_mono is not None and now >= run.deadline_mono:
                raise _Deadline()
            if not items:
                wait_s = min(idle_s - (now - last_token), METRICS_EVERY_S - (now - last_metrics))
                if run.deadline_mono is not None:
                    wait_s = min(wait_s, run.deadline_mono - now)
                if await reader.wait(max(0.0, wait_s)):
                    continue
                now = deps.clock.monotonic()
                if now - last_token >= idle_s:
                    raise _Stalled()
                if now - last_metrics >= METRICS_EVERY_S:
                    last_metrics = now
                    _metrics(running, deps)
                continue
            last_token = now
            last = items[-1]  # a Done is always the last item the reader hands over
            done = last if isinstance(last, interfaces.Done) else None
            if done is not None:
                items.pop()
            if items:  # all the tokens that arrived since the last turn, in one write
                if first_token_at is None:
                    first_token_at = reader.first_at or now
                    run.result.timings.first_token_ms = int((first_token_at - begun) * 1000)
                _tokens(running, cast(list[interfaces.Token], items), deps)
            if done is not None:
                _succeed(
                    running,
                    done,
                    deps,
                    begun=begun,
                    first_token_at=first_token_at,
                    metrics_due=now - last_metrics >= METRICS_EVERY_S,
                )
                return
            if now - last_metrics >= METRICS_EVERY_S:
                last_metrics = now
                _metrics(running, deps)
    except asyncio.CancelledError:
        if not run.cancel_requested:
            raise  # daemon shutdown: leave the task non-terminal; recovery re-runs it
        _finish(running, deps, "canceled", finish_reason="canceled")
    except _Deadline:
        _fail(
            running,
            deps,
            ErrorCode.DEADLINE_UNMET,
            f"deadline_ms: {run.task.deadline_ms} passed after {run.result.tokens_out} tokens",
        )
    except _Stalled:
        # stalled after tokens flowed: the engine is hung (a long prefill before the first
        # token is no sign of that), and the dispatcher has it restarted
        running.hung = run.result.tokens_out > 0
        _fail(
            running,
            deps,
            ErrorCode.DECODE_TIMEOUT,
            f"the engine sent no token for {idle_s:.0f} s",
            retry_after_ms=1000,
        )
    except Exception as exc:
        if run.log.terminal:  # its end is in the log, only its result write failed: the
            # log is the earlier commit; recovery writes the result from it and files the
            # task (its file stays in active/), never a result that says otherwise
            log.error("could not write the result of %s: %s", run.task_id, exc)
            deps.ended(running)
            return
        if storage_failure(exc) and run.result.tokens_out == 0:
            # its running result could not be written (a folder in the way, a full disk):
            # the task waits in active/, its log not terminal, and the recovery pass takes it
            # again once the path can be written; it is not failed for the machine's fault
            tasking.write_deferred(run.task_id, exc, correlation_id=run.log_ids["correlation_id"])
            deps.ended(running)
            return
        code, retry_after_ms, hint = engine_failure(exc)
        if hint is DISK_HINT:
            message = f"could not write the task's files: {exc}"
        elif code is ErrorCode.INTERNAL:  # a bug: report it on the task, never kill the daemon
            log.exception("unexpected error while streaming %s", run.task_id)
            message = f"{type(exc).__name__}: {exc}"
        else:
            why = llama_server.said(exc) if isinstance(exc, OSError) else str(exc)
            message = (
                f"replica {running.replica_id} failed the task after "
                f"{run.result.tokens_out} tokens: {why}"
            )
        _fail(running, deps, code, message, retry_after_ms=retry_after_ms, hint=hint)
    finally:
        if reader is not None:
            with contextlib.suppress(BaseException):  # closing drops the engine request
                await asyncio.shield(reader.close())


async def _started(run: tasking.TaskRun, reader: _Reader, deps: Deps) -> None:
    """Wait until the task's running result is on disk; where the engine's stream ends
    first, hold the task's frames back (`run.held`): its end is then written in the commit
    after, or with, the running result (which the terminal result replaces, unwritten, when
    both are in one commit), and its slot is free at once instead of a commit later."""
    durable = deps.books.landing(run.task_id)
    if durable is None:  # committed already
        return
    # its error, where the engine ended first, is the recovery pass's to handle
    durable.add_done_callback(lambda f: f.cancelled() or f.exception())
    run.held = []
    try:
        while not (durable.done() or reader.task.done()):
            timeout = None
            if run.deadline_mono is not None:  # the stream loop raises it, with frames held
                timeout = run.deadline_mono - deps.clock.monotonic()
                if timeout <= 0:
                    break
            await asyncio.wait(
                (durable, reader.task), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
    except asyncio.CancelledError:
        durable.cancel()
        raise
    if durable.done():
        durable.result()  # raised where the running result could not be written
        run.held = None


def _request(run: tasking.TaskRun) -> interfaces.GenerateRequest:
    task = run.task
    return interfaces.GenerateRequest(
        task_id=run.task_id,
        prompt=task.prompt or "",
        max_tokens=task.max_tokens,
        seed=run.result.seed or 0,
        temperature=task.sampling.temperature,
        top_p=task.sampling.top_p,
        top_k=task.sampling.top_k,
        stop=tuple(task.stop),
        chat=task.chat_json() if task.chat else None,
        # a conversation's turns reuse the slot's KV cache (the prefix they share grows each
        # turn); a lone prompt never does, so its seed gives the same text warm or cold
        reuse_cache=task.chat or task.session_id is not None,
    )


def _begin(
    running: Running,
    decision: placement.Decision,
    *,
    deps: Deps,
    gpu: results.GpuRef | None,
    engine_version: str | None,
) -> None:
    run, result = running.run, running.run.result
    result.status = "running"
    result.attempts += 1
    result.pool_id, result.replica_id = decision.pool_id, decision.replica_id
    result.gpu = gpu
    result.engine = running.lease.handle.spec.engine
    result.engine_version = engine_version
    result.kv_warmth = decision.kv_warmth
    # queue_position and predicted_start_ms stay as admission answered them: one moment,
    # which timings.queue_ms can be checked against (the `started` frame says 0 and 0)
    result.timings.started_at = clocks.rfc3339(deps.clock.now())
    result.timings.queue_ms = int((running.started_mono - run.accepted_mono) * 1000)
    result.text, result.tokens_out = "", 0
    result.tool_calls = result.reasoning = result.prompt_tokens = None
    deps.books.frame(
        run,
        "started",
        {
            "queue_position": 0,
            "predicted_start_ms": 0,
            "pool_id": decision.pool_id,
            "replica_id": decision.replica_id,
            "gpu": gpu.model_dump(mode="json") if gpu else None,
            "kv_warmth": decision.kv_warmth,
            "attempt": result.attempts,
            "engine": result.engine,
            "engine_version": engine_version,
            "model": result.model,
        },
    )
    failpoints.hit("after_started_frame")
    deps.books.save(run)
    failpoints.hit("after_started")
    _metrics(running, deps)


def _tokens(running: Running, items: list[interfaces.Token], deps: Deps) -> None:
    """`token` frames: `t` the text; in a chat, `tool_calls` the tool-call deltas and
    `reasoning` a thinking model's reasoning text, each only when the piece has them. The
    result counts them once the log has them."""
    result = running.run.result
    first = result.tokens_out
    frames: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        data: dict[str, Any] = {"t": item.text, "i": first + n}
        if item.tool_calls:
            data["tool_calls"] = [dict(call) for call in item.tool_calls]
        if item.reasoning:
            data["reasoning"] = item.reasoning
        frames.append(data)
    deps.books.frames(running.run, "token", frames)
    for item in items:
        if item.tool_calls:
            result.tool_calls = result.tool_calls or []
            chats.merge_tool_calls(result.tool_calls, item.tool_calls)
        if item.reasoning:
            result.reasoning = (result.reasoning or "") + item.reasoning
    result.text += "".join(item.text for item in items)
    result.tokens_out = running.tokens_out = first + len(items)
    failpoints.hit("after_token")


def _succeed(
    running: Running,
    item: interfaces.Done,
    deps: Deps,
    *,
    begun: float,
    first_token_at: float | None,
    metrics_due: bool = True,
) -> None:
    """The engine's stream ended well. A last `metrics` frame goes before the end only when
    one is due (the last is METRICS_EVERY_S old): the end frame holds the final counts, and
    a task shorter than that has its `metrics` frame of the start."""
    result = running.run.result
    # the engine's count is authoritative: llama-server holds back pieces of a UTF-8
    # character, so some tokens arrive with no text of their own
    result.tokens_out = max(result.tokens_out, item.tokens_out)
    result.prompt_tokens = item.prompt_tokens
    running.tokens_out = result.tokens_out
    decode_ms = (deps.clock.monotonic() - (first_token_at or begun)) * 1000
    result.timings.decode_time_ms = int(decode_ms)
    task = running.run.task
    limit = task.max_tokens
    ceiling = tasks.up_to_context(task)
    if item.truncated and result.tokens_out < limit and not ceiling:  # never a silent cut
        prompt = "" if item.prompt_tokens is None else f"{item.prompt_tokens} prompt tokens + "
        _fail(
            running,
            deps,
            ErrorCode.INVALID_PARAMS,
            f"the context filled after {result.tokens_out} of max_tokens {limit} tokens "
            f"({prompt}max_tokens {limit} exceed the context of {running.lease.handle.spec.ctx} "
            "tokens as the engine counts them): the text so far is in the result",
            hint="lower max_tokens, shorten the prompt, or use a pool with a larger ctx",
        )
        return
    deps.rates.observe(
        running.pool_id,
        tokens=result.tokens_out,
        decode_ms=decode_ms,
        first_token_ms=float(result.timings.first_token_ms or 0),
        generation=running.generation,
    )
    if metrics_due:
        _metrics(running, deps)
    # the context's end, where it is the limit: OpenAI's "length"
    finish = "length" if item.truncated else item.finish_reason
    _finish(running, deps, "succeeded", finish_reason=finish)


def _fail(
    running: Running,
    deps: Deps,
    code: ErrorCode,
    message: str,
    *,
    retry_after_ms: int | None = None,
    hint: str | None = None,
) -> None:
    error = errors.envelope(code, message, retry_after_ms=retry_after_ms, hint=hint)
    _finish(running, deps, "failed", error=error)


def _finish(
    running: Running,
    deps: Deps,
    status: results.StatusName,
    *,
    error: errors.ErrorEnvelope | None = None,
    finish_reason: str | None = None,
) -> None:
    deps.books.finish(running.run, status, error=error, finish_reason=finish_reason)
    deps.ended(running)


def _metrics(running: Running, deps: Deps) -> None:
    run = running.run
    now = deps.clock.monotonic()
    elapsed_ms = (now - running.started_mono) * 1000
    rate = deps.rates.rate(running.pool_id)
    left = max(0, run.task.max_tokens - running.tokens_out)
    probability = None
    if run.deadline_mono is not None:
        probability = estimates.on_time_probability(
            0.0, left / rate.tokens_per_s * 1000, (run.deadline_mono - now) * 1000
        )
    tokens_per_s = running.tokens_out / (elapsed_ms / 1000) if elapsed_ms > 0 else 0.0
    data: dict[str, object] = {
        "queue_depth": deps.queue_depth(),
        "on_time_probability": probability,
        "tokens_out": running.tokens_out,
        "tokens_per_s": round(tokens_per_s, 2),
        "elapsed_ms": int(elapsed_ms),
    }
    budgets = run.result.budgets
    if budgets is not None and budgets.tokens_budget_remaining is not None:
        # as at this task's acceptance: its own max_tokens were held for it then, so the
        # tokens it makes take nothing more from what a new turn may ask for
        data["tokens_budget_remaining"] = budgets.tokens_budget_remaining
    deps.books.frame(run, "metrics", data)


class _Deadline(Exception):
    pass


class _Stalled(Exception):
    pass


class _Reader:
    """Reads an engine's stream in a task of its own, so the stream loop takes whatever has
    arrived since its last turn in one go instead of paying a wait per token. A read that is
    still pending when the loop times out (to send metrics between slow tokens, or to enforce
    the deadline) goes on; the engine's error, or an end without a final frame, is raised to
    the loop after the items that came before it."""

    def __init__(
        self,
        engine_stream: AsyncIterator[interfaces.Token | interfaces.Done],
        clock: Callable[[], float],
    ) -> None:
        self._stream = engine_stream
        self._items: list[interfaces.Token | interfaces.Done] = []
        self._error: BaseException | None = None
        self._ready = asyncio.Event()
        self._clock = clock
        self.first_at: float | None = None  # when the first token arrived
        self.task = asyncio.ensure_future(self._read())  # done: its Done or error is here

    async def _read(self) -> None:
        try:
            async for item in self._stream:
                if self.first_at is None and not isinstance(item, interfaces.Done):
                    self.first_at = self._clock()
                self._items.append(item)
                self._ready.set()
                if isinstance(item, interfaces.Done):
                    return
            self._error = interfaces.EngineStreamError("the stream ended without a final frame")
        except Exception as exc:  # raised to the loop, in order
            self._error = exc
        finally:
            self._ready.set()

    def take(self) -> list[interfaces.Token | interfaces.Done]:
        items, self._items = self._items, []
        if not items and self._error is not None:
            raise self._error
        return items

    async def wait(self, timeout_s: float) -> bool:
        """Whether something arrived (or the stream ended) within `timeout_s`."""
        if self._items or self._error is not None:
            return True
        self._ready.clear()
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.wait({self.task})
        closer = getattr(self._stream, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()
