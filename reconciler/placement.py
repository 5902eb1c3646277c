"""Placement: which replica a queued task runs on, as a pure function of plain data.

The dispatcher calls `choose(want, candidates)` for the task at the head of the queue with a
snapshot of every replica, and logs `Decision.log_fields()` as the decision line. Nothing
here reads a clock, a GPU or a file, so the same inputs always give the same decision,
whatever the order of the candidates.

The rules, in order:

1. Serving: only replicas of the task's model, and of the task's pool when it names one,
   whose context per slot holds the task (`ctx >= want.context_tokens`; a candidate with
   `ctx` 0 is not known to be too small) and whose pool's `max_tokens` limit, if it has
   one, allows the task's. A replica that cannot hold the task is not a fallback either:
   the engine would refuse or truncate it, and a pool's limit is never exceeded.
2. Pin (`mode: pin`): only replicas of `pin_pool`. A pinned task never falls back, whatever
   `allow_fallback` says, and ignores `prefer_pools` and `avoid_pools`.
3. Avoid: replicas of `avoid_pools` are left out. With `allow_fallback` they come back as a
   last resort when no other serving replica is Ready (down or starting, not merely busy: a
   busy one is waited for), and using one sets `fallback_used`. A pool in both lists is
   avoided.
4. Prefer: replicas of `prefer_pools` (in any mode but pin) are tried first; when none of
   them is feasible the others are used if `allow_fallback` (setting `fallback_used`), else
   the task waits for a preferred one.
5. Feasible: state "Ready" and `slots_busy < slots_total`.
6. Session affinity: the task's last replica wins when it is feasible in the chosen group
   (`kv_warmth=True`: its KV cache may still hold the session's prefix).
7. Otherwise: fewest busy slots (the task shares the engine with the fewest others), then
   most `gpu_free_mib`, then `replica_id` ascending as a stable tie-break.

When nothing is feasible, `outcome` tells the dispatcher what to do: "wait" (a Ready replica
the task may use exists but every slot is busy: keep it queued), "unready" (replicas exist but
none is Ready: `POOL_UNREADY`), or "none" (no replica the task may use serves it:
`POOL_UNAVAILABLE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from state import ids, tasks
from state.errors import ErrorCode

READY = "Ready"

Mode = Literal["auto", "pin", "prefer"]
Outcome = Literal["assigned", "wait", "unready", "none"]

OUTCOME_CODES: dict[Outcome, ErrorCode | None] = {
    "assigned": None,
    "wait": None,
    "unready": ErrorCode.POOL_UNREADY,
    "none": ErrorCode.POOL_UNAVAILABLE,
}

# The names of the ranking criteria after affinity, in the order they are compared.
RANKING = ("fewest_busy_slots", "most_gpu_free_mib", "replica_id")


@dataclass(frozen=True)
class Candidate:
    """One replica as the dispatcher sees it now.

    `gpu_free_mib` is the caller's measure of headroom; for a replica spanning several
    devices, pass the least free among them. `devices` is carried for the log only.
    """

    replica_id: ids.ReplicaId
    pool_id: ids.PoolId
    model_id: ids.ModelId
    state: str
    slots_total: int
    slots_busy: int
    gpu_free_mib: int
    devices: tuple[int, ...] = ()
    ctx: int = 0  # context tokens per slot; 0 when unknown
    max_tokens: int | None = None  # its pool's limit on a task's max_tokens; None: none
    starting_ms: float = 0.0  # how long it has been Starting (its load's part already done)

    def holds(self, context_tokens: int) -> bool:
        return self.ctx == 0 or self.ctx >= context_tokens

    def allows(self, max_tokens: int) -> bool:
        return self.max_tokens is None or max_tokens <= self.max_tokens

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def feasible(self) -> bool:
        return self.ready and self.slots_busy < self.slots_total


@dataclass(frozen=True)
class Want:
    """What one task asks of placement: its model or pool, the overrides, its last replica."""

    task_id: ids.TaskId
    model_id: ids.ModelId | None
    pool_id: ids.PoolId | None = None
    mode: Mode = "auto"
    pin_pool: ids.PoolId | None = None
    prefer_pools: tuple[ids.PoolId, ...] = ()
    avoid_pools: tuple[ids.PoolId, ...] = ()
    allow_fallback: bool = True
    last_replica_id: ids.ReplicaId | None = None
    context_tokens: int = 0  # prompt + max_tokens, as admission estimates them
    max_tokens: int = 0  # what it may generate, held to a pool's limit (0: up to any limit)

    def __post_init__(self) -> None:
        if self.model_id is None and self.pool_id is None:
            raise ValueError("a placement want names a model or a pool")
        if self.mode == "pin" and self.pin_pool is None:
            raise ValueError("placement mode 'pin' needs a pin_pool")

    @classmethod
    def of(
        cls,
        task_id: ids.TaskId,
        task: tasks.TaskFile,
        *,
        last_replica_id: ids.ReplicaId | None = None,
        context_tokens: int = 0,
    ) -> Want:
        """The want of a task file (the session's last replica and the context estimate
        come from the caller)."""
        placement = task.placement
        return cls(
            task_id=task_id,
            model_id=ids.ModelId(task.model) if task.model else None,
            pool_id=ids.PoolId(task.pool) if task.pool else None,
            mode=placement.mode,
            pin_pool=ids.PoolId(placement.pin_pool) if placement.pin_pool else None,
            prefer_pools=tuple(ids.PoolId(p) for p in placement.prefer_pools),
            avoid_pools=tuple(ids.PoolId(p) for p in placement.avoid_pools),
            allow_fallback=placement.allow_fallback,
            last_replica_id=last_replica_id,
            context_tokens=context_tokens,
            # a ceiling (the context's end, OpenAI's default) is no ask a pool's limit refuses
            max_tokens=0 if tasks.up_to_context(task) else task.max_tokens,
        )


@dataclass(frozen=True)
class Decision:
    """The choice and the facts behind it, as the decision log line reports them."""

    replica_id: ids.ReplicaId | None
    pool_id: ids.PoolId | None
    kv_warmth: bool
    outcome: Outcome
    candidates_total: int
    candidates_feasible: int
    filters_applied: tuple[str, ...]
    tie_breakers: tuple[str, ...]
    pinned: bool
    fallback_used: bool

    @property
    def code(self) -> ErrorCode | None:
        """`POOL_UNREADY` for "unready", `POOL_UNAVAILABLE` for "none", else None."""
        return OUTCOME_CODES[self.outcome]

    def log_fields(self) -> dict[str, object]:
        return {
            "outcome": self.outcome,
            "selected_replica_id": self.replica_id,
            "selected_pool_id": self.pool_id,
            "kv_warmth": self.kv_warmth,
            "candidates_total": self.candidates_total,
            "candidates_feasible": self.candidates_feasible,
            "filters_applied": list(self.filters_applied),
            "tie_breakers_applied": list(self.tie_breakers),
            "pinned": self.pinned,
            "fallback_used": self.fallback_used,
        }


def choose(want: Want, candidates: Iterable[Candidate]) -> Decision:
    """Pick a replica for `want` among `candidates` by the rules in the module docstring."""
    everyone = tuple(candidates)
    if len({c.replica_id for c in everyone}) != len(everyone):
        raise ValueError("candidates must have distinct replica ids")
    filters: list[str] = []
    groups = _allowed_groups(want, everyone, filters)
    filters += ["ready", "free_slot"]

    allowed = [c for group in groups for c in group]
    feasible_total = sum(c.feasible for c in allowed)
    for index, group in enumerate(groups):
        feasible = [c for c in group if c.feasible]
        if feasible:
            winner, tie_breakers, warm = _rank(feasible, want.last_replica_id)
            return Decision(
                replica_id=winner.replica_id,
                pool_id=winner.pool_id,
                kv_warmth=warm,
                outcome="assigned",
                candidates_total=len(everyone),
                candidates_feasible=feasible_total,
                filters_applied=tuple(filters),
                tie_breakers=tie_breakers,
                pinned=want.mode == "pin",
                fallback_used=index > 0,
            )
    outcome: Outcome
    if any(c.ready for c in allowed):
        outcome = "wait"
    elif allowed:
        outcome = "unready"
    else:
        outcome = "none"
    return Decision(
        replica_id=None,
        pool_id=None,
        kv_warmth=False,
        outcome=outcome,
        candidates_total=len(everyone),
        candidates_feasible=0,
        filters_applied=tuple(filters),
        tie_breakers=(),
        pinned=want.mode == "pin",
        fallback_used=False,
    )


def allowed(want: Want, candidates: Iterable[Candidate]) -> list[Candidate]:
    """The replicas `want` may run on now, by the rules above (fallbacks included where it
    allows them), whatever their state: what its start is estimated over."""
    return [c for group in _allowed_groups(want, tuple(candidates), []) for c in group]


def _allowed_groups(
    want: Want, everyone: Sequence[Candidate], filters: list[str]
) -> list[Sequence[Candidate]]:
    serving = everyone
    if want.model_id is not None:
        filters.append("serves_model")
        serving = tuple(c for c in serving if c.model_id == want.model_id)
    if want.pool_id is not None:
        filters.append("serves_pool")
        serving = tuple(c for c in serving if c.pool_id == want.pool_id)
    if want.context_tokens > 0:
        filters.append("ctx_fits")
        serving = tuple(c for c in serving if c.holds(want.context_tokens))
    if want.max_tokens > 0 and any(c.max_tokens is not None for c in serving):
        filters.append("max_tokens_allowed")
        serving = tuple(c for c in serving if c.allows(want.max_tokens))
    return _groups(want, serving, filters)


def _groups(
    want: Want, serving: Sequence[Candidate], filters: list[str]
) -> list[Sequence[Candidate]]:
    """The replicas the task may use, in groups tried in order (later groups are fallbacks)."""
    if want.mode == "pin":
        filters.append("pin_pool")
        return [tuple(c for c in serving if c.pool_id == want.pin_pool)]
    kept: Sequence[Candidate] = serving
    avoided: Sequence[Candidate] = ()
    if want.avoid_pools:
        filters.append("avoid_pools")
        kept = tuple(c for c in serving if c.pool_id not in want.avoid_pools)
        avoided = tuple(c for c in serving if c.pool_id in want.avoid_pools)
    groups: list[Sequence[Candidate]] = [kept]
    if want.prefer_pools:
        filters.append("prefer_pools")
        preferred = tuple(c for c in kept if c.pool_id in want.prefer_pools)
        others = tuple(c for c in kept if c.pool_id not in want.prefer_pools)
        groups = [preferred, others] if want.allow_fallback else [preferred]
    if want.allow_fallback and avoided and not any(c.ready for c in kept):
        groups.append(avoided)
    return groups


def _rank(
    feasible: Sequence[Candidate], last_replica_id: ids.ReplicaId | None
) -> tuple[Candidate, tuple[str, ...], bool]:
    """The winner, the criteria that were needed to separate it, and its KV warmth."""
    for candidate in feasible:
        if candidate.replica_id == last_replica_id:
            return candidate, ("session_affinity",), True

    def key(c: Candidate) -> tuple[int, int, str]:
        return (c.slots_busy, -c.gpu_free_mib, c.replica_id)

    ranked = sorted(feasible, key=key)
    winner = ranked[0]
    if len(ranked) == 1:
        return winner, (), False
    applied: list[str] = []
    for name, mine, theirs in zip(RANKING, key(winner), key(ranked[1]), strict=True):
        applied.append(name)
        if mine != theirs:
            break
    return winner, tuple(applied), False
