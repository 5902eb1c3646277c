"""Admission guardrails, checked before a task is queued. Pure: plain data in, an error out.

The dispatcher calls `check` for every parsed task; a non-None envelope becomes a `rejected`
result. Queue capacity and full policy are applied afterwards by the queue itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from state import chats, desired, errors, ids, tasks
from state.errors import ErrorCode, ErrorEnvelope

# Below this probability of finishing in time, a deadline counts as infeasible at admission.
DEADLINE_FLOOR = 0.05
BYTES_PER_TOKEN = 4  # prompt length estimate before tokenization; conservative for code/English
TEMPLATE_TOKENS = 8  # what a chat template adds around each message (role markers, newlines)
LIVE = ("Ready", "Progressing")  # pool states a task may be queued for


@dataclass(frozen=True)
class PoolView:
    pool_id: str
    model_id: str
    state: str  # Ready | Progressing | Unschedulable | Failed
    reason: str | None
    ctx: int
    max_tokens: int | None


@dataclass(frozen=True)
class Target:
    """What an admitted task will run: its model and, when it names one, its pool."""

    model_id: ids.ModelId
    pool_id: ids.PoolId | None


def resolve(
    task: tasks.TaskFile,
    state: desired.DesiredState,
    *,
    reloading: Mapping[str, str] | None = None,
) -> Target | ErrorEnvelope:
    """The task's target. A pool being reloaded (`reloading`: pool → the model it served
    before) is taken as serving its model from before, the one it keeps if the reload
    fails, and its new one too (a task naming either waits for the outcome); a task naming
    only the pool is bound to the model from before, and follows the pool to the new one
    once the reload has succeeded (`Dispatcher._follow_pools`)."""
    if task.pool is not None:
        pool = state.pool(task.pool)
        if pool is None:
            return errors.envelope(  # a mistake in the task, not a pool that is down
                ErrorCode.INVALID_PARAMS,
                f"pool: {task.pool!r} is not in orch.yaml",
                hint=f"use one of: {', '.join(p.id for p in state.pools) or 'no pools defined'}",
            )
        before = (reloading or {}).get(pool.id)
        if before is not None:
            model = task.model if task.model in (before, pool.model) else before
            if task.model is None or task.model == model:
                return Target(ids.ModelId(model), ids.PoolId(pool.id))
        if task.model is not None and task.model != pool.model:
            return errors.envelope(
                ErrorCode.INVALID_PARAMS,
                f"model: {task.model!r} does not match pool {pool.id!r}, "
                f"which serves {pool.model!r}",
                hint="name only the pool, or only the model",
            )
        return Target(ids.ModelId(pool.model), ids.PoolId(pool.id))
    assert task.model is not None
    return Target(ids.ModelId(task.model), None)


def _unplaceable(
    placement: tasks.Placement, model_id: str, serving: list[PoolView]
) -> ErrorEnvelope | list[PoolView]:
    """The pools a placement's avoid and prefer lists leave the task (all of `serving` when
    it allows a fallback); when they leave none of orch.yaml's pools serving the model the
    task could never start, so it is refused now, naming the list (as a pin to a pool that
    does not serve it is), instead of waiting in the queue forever."""
    if placement.allow_fallback or not serving:
        return serving
    names = sorted(p.pool_id for p in serving)
    left = placement.leaves(names)
    if left:
        return [p for p in serving if p.pool_id in left]
    field, given = "placement.avoid_pools", placement.avoid_pools
    if placement.prefer_pools and any(n not in placement.avoid_pools for n in names):
        field, given = "placement.prefer_pools", placement.prefer_pools  # it left none
    return errors.envelope(
        ErrorCode.INVALID_PARAMS,
        f"{field}: {list(given)!r} leaves no pool serving {model_id!r} "
        f"(of {', '.join(names)}), and allow_fallback is false: the task could never start",
        hint=f"name a pool serving {model_id!r} ({', '.join(names)}), "
        "or set placement.allow_fallback: true",
    )


def check(
    task: tasks.TaskFile,
    target: Target,
    *,
    state: desired.DesiredState,
    pools: dict[str, PoolView],
    blocked: Mapping[str, str] | None = None,
) -> ErrorEnvelope | None:
    """The first guardrail `task` fails, or None. `blocked` maps the models whose file failed
    its digest check (as declared now) to why: those are refused until a check passes."""
    if target.pool_id is not None and state.pool(target.pool_id) is None:
        # a task naming a pool that was removed or renamed since it was admitted
        return errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"pool: {target.pool_id!r} is not in orch.yaml any more",
            hint=f"submit it again naming one of: "
            f"{', '.join(p.id for p in state.pools) or 'no pools defined'}",
        )
    model = state.models.get(target.model_id)
    if model is None:
        return errors.envelope(
            ErrorCode.MODEL_UNKNOWN,
            f"model: {target.model_id!r} is not in orch.yaml",
            hint=state.use_one_of(),
        )
    if model.state == "Retired":
        return errors.envelope(
            ErrorCode.MODEL_RETIRED,
            f"model: {target.model_id!r} is Retired",
            hint=f"{state.use_one_of()}, or set its state: Active",
        )
    if blocked and target.model_id in blocked:
        return errors.envelope(
            ErrorCode.UNTRUSTED_ARTIFACT,
            f"model: {target.model_id!r} failed verification: {blocked[target.model_id]}",
            hint=f"put the right file in place (or fix models.{target.model_id}.digest in "
            f"orch.yaml), then POST /v1/catalog/models/{target.model_id}/verify",
        )
    serving = [p for p in pools.values() if p.model_id == target.model_id]
    if target.pool_id is not None:
        serving = [p for p in serving if p.pool_id == target.pool_id]
    placement = task.placement
    if placement.mode == "pin":
        pinned = pools.get(placement.pin_pool or "")
        if pinned is None or pinned.model_id != target.model_id:
            return errors.envelope(
                ErrorCode.INVALID_PARAMS,
                f"placement.pin_pool: {placement.pin_pool!r} is not a pool serving "
                f"{target.model_id!r}",
                hint="pin a pool listed by `orchctl status`, or use mode: prefer",
            )
        # A pinned pool that is still loading is waited for, like any pool; one that cannot
        # come up (Failed, Unschedulable) fails the task below, since a pin never falls back.
        serving = [pinned]
    else:
        # without a fallback, the pools its lists leave are all it may ever run on: what
        # follows (up, max_tokens, context) is judged on those alone, as for a pin
        allowed = _unplaceable(placement, target.model_id, serving)
        if isinstance(allowed, ErrorEnvelope):
            return allowed
        serving = allowed
    live = [p for p in serving if p.state in LIVE]
    if not live:
        why = "; ".join(f"{p.pool_id} is {p.state}: {p.reason}" for p in serving if p.reason)
        pinned_hint = (
            "a pinned task never falls back: fix the pool (`orchctl status` shows why), "
            "or use placement mode: prefer"
        )
        named = target.pool_id or (placement.pin_pool if placement.mode == "pin" else None)
        others = sorted(
            p.pool_id
            for p in pools.values()
            if p.model_id == target.model_id and p.state in LIVE and p.pool_id != named
        )
        hint = pinned_hint if placement.mode == "pin" else None
        drained = [p.pool_id for p in serving if p.reason and "drained on request" in p.reason]
        if hint is None and drained:  # not orch.yaml's doing: the code table's hint is not it
            hint = f"bring it back with POST /v1/pools/{drained[0]}/reload (no body needed)"
        narrowed = named is None and placement.mode != "pin" and not placement.allow_fallback
        if named is not None and others:  # the task chose this pool; others would serve it
            hint = (
                f"pool{'s' if len(others) > 1 else ''} {', '.join(others)} also "
                f"serve{'s' if len(others) == 1 else ''} "
                f"{target.model_id!r}: name model: {target.model_id} (not the pool) to use it"
            )
        elif narrowed and others:  # its prefer/avoid lists leave it the pools that cannot
            hint = (
                f"set placement.allow_fallback: true to let {', '.join(others)} serve it, or "
                "fix the pools it allows (`orchctl status` shows why)"
            )
        where = ", ".join(p.pool_id for p in serving)
        refused = errors.envelope(
            ErrorCode.POOL_UNAVAILABLE,
            (
                f"pool {named!r} cannot serve model {target.model_id!r} now"
                if named is not None
                else f"no pool its placement allows ({where}) can serve model "
                f"{target.model_id!r} now"
                if narrowed
                else f"no pool can serve model {target.model_id!r}"
            )
            + (f" ({why})" if why else ""),
            retry_after_ms=5000,
            hint=hint,
        )
        if any(p.state == "Unschedulable" for p in serving):
            return refused  # GPU memory freed elsewhere may let it come up: worth a retry
        # no pool at all, or only pools that stay down until someone acts (Failed: its
        # breaker open; Stopped: drained on request, or no replicas): a client that retries
        # (the OpenAI SDKs do, on 503) only waits for the same answer
        return refused.model_copy(update={"retriable": False, "retry_after_ms": None})
    # a pool runs only tasks within its own max_tokens (placement holds to it too): one pool
    # without a limit, or with one high enough, is enough
    ceiling = tasks.up_to_context(task)
    allowing = [
        p for p in live if ceiling or p.max_tokens is None or task.max_tokens <= p.max_tokens
    ]
    if not allowing:
        limit = max(p.max_tokens or 0 for p in live)
        return errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"max_tokens: {task.max_tokens} is over the pool limit {limit}",
            hint=f"ask for at most {limit} tokens",
        )
    ctx = max(p.ctx for p in live)
    prompt = prompt_tokens(task)
    if prompt >= ctx:  # the prompt alone fills the context: max_tokens is not the fault
        field = "prompt" if task.messages is None else "messages"
        return errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"{field}: about {prompt} tokens, more than the context of {ctx} tokens per "
            "slot holds before a token is generated",
            hint=f"shorten the {field} (to well under {ctx * BYTES_PER_TOKEN // 1024} KiB of "
            "text), or raise the pool's ctx",
        )
    if context_tokens(task) > ctx:
        return errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"max_tokens: about {prompt_tokens(task)} prompt tokens + {task.max_tokens} "
            f"max_tokens exceed the context of {ctx} tokens per slot",
            hint="shorten the prompt, lower max_tokens, or raise the pool's ctx",
        )
    roomy = [p for p in live if p.ctx >= context_tokens(task)]
    if not any(p in allowing for p in roomy):  # each limit alone is met, never both at once
        limit = max(p.max_tokens or 0 for p in roomy)  # each has one, under the task's
        return errors.envelope(
            ErrorCode.INVALID_PARAMS,
            f"max_tokens: {task.max_tokens} with about {prompt} prompt tokens fits no one pool: "
            f"those whose ctx holds it ({', '.join(sorted(p.pool_id for p in roomy))}) limit "
            f"max_tokens to {limit} at most, and those that allow it have less context",
            hint=f"ask for at most {limit} tokens, or shorten the prompt",
        )
    return None


def prompt_tokens(task: tasks.TaskFile) -> int:
    """The prompt's length in tokens before the engine's tokenizer is asked: UTF-8 bytes /
    BYTES_PER_TOKEN, rounded up (about right for English and code with a BPE vocabulary). A
    chat counts its messages and tool definitions, plus what a chat template adds per message
    and for the assistant turn it opens for the answer (the + 1)."""
    if task.messages is None:
        return math.ceil(len((task.prompt or "").encode()) / BYTES_PER_TOKEN)
    size = chats.size_bytes(task.messages, task.tools)
    return math.ceil(size / BYTES_PER_TOKEN) + TEMPLATE_TOKENS * (len(task.messages) + 1)


def context_tokens(task: tasks.TaskFile) -> int:
    """The context a slot must hold for the task: its prompt plus everything it may generate
    (a task whose max_tokens is only a ceiling, the context's end being its limit: its
    prompt and one token). Placement sends a task only to replicas whose ctx per slot is at
    least this."""
    if tasks.up_to_context(task):
        return prompt_tokens(task) + 1
    return prompt_tokens(task) + task.max_tokens


def deadline_error(
    task: tasks.TaskFile, *, predicted_start_ms: float | None, probability: float | None
) -> ErrorEnvelope | None:
    if task.deadline_ms is None or probability is None or probability >= DEADLINE_FLOOR:
        return None
    start = "unknown" if predicted_start_ms is None else f"{predicted_start_ms:.0f} ms"
    return errors.envelope(
        ErrorCode.DEADLINE_UNMET,
        f"deadline_ms: {task.deadline_ms} cannot be met (predicted start {start}, "
        f"on-time probability {_below(probability, DEADLINE_FLOOR)}, under {DEADLINE_FLOOR:g})",
    )


def _below(value: float, floor: float) -> str:
    """`value`, known to be under `floor`, in as few digits as show it is (0.0484 is no
    "0.05" beside a floor of 0.05)."""
    for digits in range(2, 6):
        shown = f"{value:.{digits}f}"
        if float(shown) < floor:
            return shown
    return f"{value:.2g}"
