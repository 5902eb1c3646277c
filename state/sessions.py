"""Sessions: files under <state>/sessions/<session_id>.json grouping a client's turns.

A session expires `ttl_s` after its last use and is evicted after `max_turns` turns (or when
its token budget is spent). An evicted session leaves a tombstone, so the next request that
names it gets a typed error (SESSION_EXPIRED, SESSION_TURNS_EXCEEDED, SESSION_BUDGET_EXCEEDED)
instead of silently starting over. Files, so a daemon restart keeps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from state import atomic, ids

Eviction = Literal["expired", "turns", "budget"]


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


class SessionStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, session_id: str) -> Path:
        if not ids.is_safe_id(session_id):
            raise ValueError(f"unsafe session id {session_id!r}")
        return self.root / f"{session_id}.json"

    def get(self, session_id: str) -> Session | None:
        try:
            return Session.model_validate_json(self._path(session_id).read_bytes())
        except (OSError, ValidationError):
            return None

    def put(self, session: Session) -> None:
        atomic.write_bytes(
            self._path(session.session_id), session.model_dump_json(indent=2).encode() + b"\n"
        )

    def all(self) -> list[Session]:
        out = []
        for path in sorted(self.root.glob("*.json")):
            try:
                out.append(Session.model_validate_json(path.read_bytes()))
            except (OSError, ValidationError):
                continue
        return out


def limit_reached(
    session: Session, *, now: float, ttl_s: float, max_turns: int, token_budget: int | None
) -> Eviction | None:
    """Which limit, if any, ends this session before its next turn."""
    if session.evicted:
        return session.evicted
    if now - session.last_used_at > ttl_s:
        return "expired"
    if session.turns >= max_turns:
        return "turns"
    if token_budget is not None and session.tokens_out >= token_budget:
        return "budget"
    return None


def evict(session: Session, reason: Eviction, *, now: float) -> Session:
    return session.model_copy(update={"evicted": reason, "evicted_at": now})
