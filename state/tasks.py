"""Task files: what a user or agent drops into spool/incoming/ (YAML or JSON)."""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from state import ids

Id = Annotated[str, Field(pattern=ids.ID_PATTERN), AfterValidator(ids.check_safe_id)]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)


class Placement(BaseModel):
    """Placement overrides: pin to one pool (never falls back), prefer, or avoid pools."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["auto", "pin", "prefer"] = "auto"
    pin_pool: Id | None = None
    prefer_pools: list[Id] = Field(default_factory=list)
    avoid_pools: list[Id] = Field(default_factory=list)
    allow_fallback: bool = True

    @model_validator(mode="after")
    def _pin_names_pool(self) -> Placement:
        if self.mode == "pin" and not self.pin_pool:
            raise ValueError("placement mode 'pin' needs 'pin_pool: <pool id>'")
        return self


class TaskFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: Id | None = Field(None, description="default: the file name's stem")
    session_id: Id | None = None
    model: Id | None = Field(None, description="a model id from orch.yaml")
    pool: Id | None = Field(None, description="or a pool id (the task runs on that pool)")
    prompt: str = Field(min_length=1, max_length=512 * 1024)
    max_tokens: int = Field(ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    priority: Literal["interactive", "batch"] = "batch"
    deadline_ms: int | None = Field(None, ge=1, description="relative to acceptance")
    sampling: Sampling = Field(default_factory=Sampling)
    placement: Placement = Field(default_factory=Placement)
    correlation_id: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="set by the HTTP face from X-Correlation-Id; log lines of the task carry it",
    )
    labels: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=1024)]] = (
        Field(default_factory=dict, max_length=64)
    )

    @model_validator(mode="after")
    def _model_or_pool(self) -> TaskFile:
        if not self.model and not self.pool:
            raise ValueError("a task names 'model: <model id>' or 'pool: <pool id>'")
        return self


def default_seed(task_id: str) -> int:
    """A seed derived from the task id, so a retried task produces the same text."""
    return int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:4], "big") & 0x7FFFFFFF


TASK_SUFFIXES = (".task.yaml", ".task.yml", ".task.json")


def stem(file_name: str) -> str:
    """The task id a file name implies: `fix-bug.task.yaml` → `fix-bug`."""
    for suffix in TASK_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name.rsplit(".", 1)[0]
