"""Sessions: files under <state>/sessions/<session_id>.json grouping a client's turns.

The dispatcher calls `refusal` when it admits a turn, `count_turn` once the turn is queued,
`touch` when it ends and `sweep` now and then. Recovered tasks skip `refusal` (they were
admitted before the restart); `count_turn` is idempotent per task id.

A session expires `ttl_s` after its last use and is evicted after `max_turns` turns (or when
its token budget is spent). An evicted session leaves a tombstone, so the next request that
names it gets a typed error (SESSION_EXPIRED, SESSION_TURNS_EXCEEDED, SESSION_BUDGET_EXCEEDED)
instead of silently starting over. A session closed at its turns or token budget opens again
once orch.yaml raises that limit above what it used. Files, so a daemon restart keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from state import atomic, desired, errors, ids, results, tasks
from state.errors import ErrorCode

Eviction = Literal["expired", "turns", "budget"]


# The label of a task made from an OpenAI request whose session came from the `user` field (an
# end-user tag) rather than a session id the client chose: such a session starts over at its
# TTL or turn limit instead of refusing (reconciler.admitting).
FROM_LABEL, FROM_OPENAI_USER = tasks.SESSION_FROM_LABEL, tasks.SESSION_FROM_USER


class Session(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str
    created_at: float
    last_used_at: float
    turns: int = 0
    tokens_out: int = 0
    last_replica_id: str | None = None
    evicted: Eviction | None = None
    evicted_at: float | None = None
    # the tasks counted as turns, so counting is idempotent: a task re-admitted after a
    # crash (between this write and its queued result) is not a second turn
    turn_task_ids: list[str] = []


class SessionStore:
    def __init__(self, root: Path, *, damaged: Callable[[Path, str], None] | None = None) -> None:
        self.root = root
        # told of a session file that is there but cannot be used (the daemon logs it): its
        # session starts again, its turns and tokens counted from 0
        self.damaged = damaged
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str) -> Path:
        if not ids.is_safe_id(session_id):
            raise ValueError(f"unsafe session id {session_id!r}")
        return self.root / f"{session_id}.json"

    def get(self, session_id: str) -> Session | None:
        path = self._path(session_id)
        try:
            return Session.model_validate_json(atomic.read_bytes(path))
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            if self.damaged is not None:
                why = exc.strerror if isinstance(exc, OSError) else "not a session record"
                self.damaged(path, str(why))
            return None

    def remove(self, session_id: str) -> None:
        """Forget a session: in order with its writes still to be committed (a turn's end
        updates it in its task's group commit), which would otherwise bring it back."""
        atomic.remove(self._path(session_id))

    def put(self, session: Session) -> None:
        atomic.write_bytes(
            self._path(session.session_id),
            session.model_dump_json(indent=2).encode() + b"\n",
            kind="session",
        )

    def all(self) -> list[Session]:
        out = []
        for path in sorted(self.root.glob("*.json")):
            try:
                out.append(Session.model_validate_json(atomic.read_bytes(path)))
            except (OSError, ValidationError):
                continue
        return out


def limit_reached(
    session: Session,
    *,
    now: float,
    ttl_s: float,
    max_turns: int,
    token_budget: int | None,
    in_use: bool = False,
    task_id: str | None = None,
) -> Eviction | None:
    """Which limit, if any, ends this session before its next turn. A session `in_use` (a
    task of it queued or running) does not expire: its TTL counts from its last use. A task
    counted as a turn already (sent again after a refusal or an eviction that said to retry
    with its id) is that turn, not another: the turn limit does not refuse it."""
    if session.evicted:
        return session.evicted
    if not in_use and now - session.last_used_at > ttl_s:
        return "expired"
    if session.turns >= max_turns and task_id not in session.turn_task_ids:
        return "turns"
    if token_budget is not None and session.tokens_out >= token_budget:
        return "budget"
    return None


def budgets(session: Session, limits: desired.SessionsConfig, *, now: float) -> results.Budgets:
    """What `session` has left now under `limits` (never below 0)."""
    tokens = None
    if limits.token_budget is not None:
        tokens = max(0, limits.token_budget - session.tokens_out)
    return results.Budgets(
        session_id=session.session_id,
        turns_remaining=max(0, limits.max_turns - session.turns),
        tokens_budget_remaining=tokens,
        ttl_ms_remaining=max(0, round((limits.ttl_s - (now - session.last_used_at)) * 1000)),
    )


def _lifted(session: Session, limits: desired.SessionsConfig) -> bool:
    """Whether the limit that closed `session` no longer holds: its turns or tokens are
    under what orch.yaml allows now (a session that expired stays expired)."""
    if session.evicted == "turns":
        return session.turns < limits.max_turns
    if session.evicted == "budget":
        return limits.token_budget is None or session.tokens_out < limits.token_budget
    return False


def evict(session: Session, reason: Eviction, *, now: float) -> Session:
    return session.model_copy(update={"evicted": reason, "evicted_at": now})


def refusal(
    store: SessionStore,
    session_id: str,
    limits: desired.SessionsConfig,
    *,
    now: float,
    max_tokens: int = 0,
    pending_tokens: int = 0,
    in_use: bool = False,
    task_id: str | None = None,
) -> errors.ErrorEnvelope | None:
    """The error for a new turn of a session past one of its limits (evicting it then, so
    the next turn names the same limit), or for a turn asking for `max_tokens` more than its
    token budget has left once `pending_tokens` (its turns still queued or running) are
    counted; None when the turn may run."""
    session = store.get(session_id)
    if session is None:
        return _over_budget(None, session_id, limits, max_tokens, pending_tokens)
    if _lifted(session, limits):  # closed at a limit orch.yaml has since raised: open again
        session = session.model_copy(update={"evicted": None, "evicted_at": None})
        store.put(session)
    reason = limit_reached(
        session,
        now=now,
        ttl_s=limits.ttl_s,
        max_turns=limits.max_turns,
        token_budget=limits.token_budget,
        in_use=in_use,
        task_id=task_id,
    )
    if reason is None:
        return _over_budget(session, session_id, limits, max_tokens, pending_tokens)
    if not session.evicted:
        store.put(evict(session, reason, now=now))
    code, text = {
        "expired": (
            ErrorCode.SESSION_EXPIRED,
            f"session {session_id!r} expired after {limits.ttl_s:.0f} s without use",
        ),
        "turns": (
            ErrorCode.SESSION_TURNS_EXCEEDED,
            f"session {session_id!r} reached its limit of {limits.max_turns} turns",
        ),
        "budget": (
            ErrorCode.SESSION_BUDGET_EXCEEDED,
            f"session {session_id!r} spent its budget of {limits.token_budget} tokens",
        ),
    }[reason]
    return errors.envelope(code, text)


def _over_budget(
    session: Session | None,
    session_id: str,
    limits: desired.SessionsConfig,
    max_tokens: int,
    pending_tokens: int,
) -> errors.ErrorEnvelope | None:
    """The refusal of a turn that could write more than the budget has left: a session
    never writes more than its budget (the turn is refused, the session is not evicted)."""
    budget = limits.token_budget
    if budget is None:
        return None
    spent = session.tokens_out if session is not None else 0
    left = max(0, budget - spent - pending_tokens)
    if max_tokens <= left:
        return None
    return errors.envelope(
        ErrorCode.SESSION_BUDGET_EXCEEDED,
        f"max_tokens: {max_tokens} is over what session {session_id!r} has left of its "
        f"{budget}-token budget ({left}, counting its tasks still queued or running)",
        hint=f"lower max_tokens to {left}, or start a new session_id"
        if left
        else "start a new session_id, or raise sessions.token_budget",
    )


def start_over(store: SessionStore, session_id: str, *, now: float) -> None:
    """Replace the session with a fresh one of the same id: no turns, no tokens, no eviction."""
    store.put(Session(session_id=session_id, created_at=now, last_used_at=now))


def count_turn(store: SessionStore, session_id: str, task_id: str, *, now: float) -> None:
    """Count `task_id` as a turn of the session, once however often it is admitted."""
    session = store.get(session_id) or Session(
        session_id=session_id, created_at=now, last_used_at=now
    )
    if task_id in session.turn_task_ids:
        return
    update = {
        "turns": session.turns + 1,
        "last_used_at": now,
        "turn_task_ids": [*session.turn_task_ids, task_id],
    }
    store.put(session.model_copy(update=update))


def touch(
    store: SessionStore,
    session_id: str,
    task_id: str,
    *,
    now: float,
    replica_id: str,
    tokens_out: int,
) -> None:
    """Turn `task_id` ended on `replica_id`: the next turn prefers it (its KV cache is warm),
    and its tokens count. Only for the session it was a turn of: one deleted (or started
    over) meanwhile is gone with its turns, and a new session of its id owes them nothing."""
    session = store.get(session_id)
    if session is None or task_id not in session.turn_task_ids:
        return
    store.put(
        session.model_copy(
            update={
                "last_used_at": now,
                "last_replica_id": replica_id,
                "tokens_out": session.tokens_out + tokens_out,
            }
        )
    )


def sweep(
    store: SessionStore, *, ttl_s: float, now: float, in_use: Collection[str] = ()
) -> list[Session]:
    """Evict sessions past their TTL, but those `in_use` (a task of theirs queued or
    running); returns the ones evicted now."""
    evicted = []
    for session in store.all():
        if session.session_id in in_use:
            continue
        if session.evicted is None and now - session.last_used_at > ttl_s:
            store.put(evict(session, "expired", now=now))
            evicted.append(session)
    return evicted
