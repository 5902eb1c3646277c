"""Pool drains requested over HTTP (`<state>/drains.json`), kept across daemon restarts.

`POST /v1/pools/{id}/drain` records one through `pools.PoolRuntime.drain_pool`; the reconcile
loop then wants no replica of the pool, so its replicas are drained and none is restarted.
A drain is lifted by `POST /v1/pools/{id}/reload`, or when the pool's config changes: the
record keeps the pool's spec hash at drain time, and a pool whose hash differs is no longer
the pool that was drained.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from state import atomic

FILE_NAME = "drains.json"


class Drain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool_id: str
    spec_hash: str = Field(description="the pool's spec hash when it was drained")
    deadline_ms: int = Field(ge=0, description="how long in-flight tasks may finish")
    drained_at: str = Field(description="RFC 3339")


class DrainBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: dict[str, Drain] = Field(default_factory=dict)


def load(state_dir: Path) -> dict[str, Drain]:
    """The recorded drains; none when the file is missing or unreadable."""
    try:
        return dict(DrainBook.model_validate_json((state_dir / FILE_NAME).read_bytes()).pools)
    except (OSError, ValidationError, ValueError):
        return {}


def save(state_dir: Path, drains: dict[str, Drain]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(state_dir / FILE_NAME, json.loads(DrainBook(pools=drains).model_dump_json()))
