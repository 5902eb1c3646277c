"""The harness of the home reference smoke (HME-040): the `Smoke` every check of
`smoke_checks` is handed (the daemon's client, the run's id and folder, what the checks have
seen so far, and the helpers they share), and `run`, which `cli_smoke` calls for each check.

A check is a function of a `Smoke` that returns what it saw, or raises `Failed` (with why)
or `NotRun` (with why: a route the daemon does not offer, by name, or something the
workstation lacks, such as GPUs of two sizes). `run` turns each into a `Check`: passed,
failed or not run, and never raises: a daemon that stops answering, or a surprise, fails
the check it was in and no other.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from reconciler import api_client

State = Literal["passed", "failed", "not run"]
PROMPT = "Write one sentence about graphics cards."
WAIT_S = 60.0  # the longest a check waits for a state it asked for


@dataclass(frozen=True)
class Check:
    name: str
    state: State
    detail: str
    took_s: float = 0.0


@dataclass
class Smoke:
    client: api_client.Client
    run_id: str
    out: Path
    determinism_seeds: int = 4
    offered: set[tuple[str, str]] | None = None  # None: no /openapi.yaml, try every route
    seen_engines: dict[str, str] = field(default_factory=dict)  # pool → engine_version
    status: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    _count: int = 0

    # -- helpers the checks share ------------------------------------------------------------

    def missing(self, *routes: str) -> str | None:
        """The first of `routes` ("POST /v1/x") the daemon does not offer, or None."""
        if self.offered is None:
            return None
        for route in routes:
            method, path = route.split(" ", 1)
            if (method, path) not in self.offered:
                return route
        return None

    def refresh(self) -> dict[str, Any]:
        answer = self.client.get("/v1/status")
        if answer.status == 200 and isinstance(answer.json, dict):
            self.status = answer.json
        return self.status

    def ready_pools(self) -> list[dict[str, Any]]:
        return [
            p
            for p in self.refresh().get("pools", [])
            if p["state"] == "Ready" and any(r["state"] == "Ready" for r in p["replicas"])
        ]

    def task_id(self, label: str) -> str:
        self._count += 1
        return f"smoke-{self.run_id}-{self._count:03d}-{label}"[:128]

    def task(self, label: str, model: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "task_id": self.task_id(label),
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 16,
            "seed": 1,
            "sampling": {"temperature": 0.7},
            "labels": {"suite": "smoke"},
        }
        body.update(fields)
        return body

    def long_tokens(self, pool_id: str) -> int:
        """A max_tokens the pool accepts that keeps a slot busy for seconds."""
        for p in self.capabilities.get("pools", []):
            if p["pool_id"] == pool_id:
                limit = p.get("max_tokens") or max(16, (p.get("ctx") or 512) - 64)
                return int(min(2000, limit))
        return 256

    def follow(self, task_id: str) -> list[Any]:
        return list(self.client.frames(task_id))

    def result(self, task_id: str) -> dict[str, Any]:
        body = self.client.get(f"/v1/tasks/{task_id}").json
        result = body if isinstance(body, dict) else {}
        if result.get("engine_version") and result.get("pool_id"):
            self.seen_engines[result["pool_id"]] = result["engine_version"]
        return result

    def until(self, what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
        end = time.monotonic() + timeout_s
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() >= end:
                raise Failed(f"{what} within {timeout_s:.0f} s")
            time.sleep(0.05)


class Failed(Exception):
    """A check saw something wrong; the message says what."""


class NotRun(Exception):
    """A check cannot run here; the message says why."""


def run(smoke: Smoke, check: Callable[[Smoke], str], name: str) -> Check:
    began = time.monotonic()
    try:
        detail, state = check(smoke), "passed"
    except NotRun as why:
        detail, state = str(why), "not run"
    except Failed as why:
        detail, state = str(why), "failed"
    except api_client.Unreachable as exc:
        detail, state = f"the daemon stopped answering: {exc}", "failed"
    except Exception as exc:  # a surprise fails this check, not the report
        detail, state = f"unexpected {type(exc).__name__}: {exc}", "failed"
    return Check(name, state, detail, time.monotonic() - began)  # type: ignore[arg-type]


def need(smoke: Smoke, *routes: str) -> None:
    """Not run (`NotRun`) when the daemon does not offer one of `routes`."""
    route = smoke.missing(*routes)
    if route is not None:
        raise NotRun(f"the daemon does not offer {route}")


def first_pool(smoke: Smoke) -> dict[str, Any]:
    """The first Ready pool; failed (`Failed`) when none is."""
    pools = smoke.ready_pools()
    if not pools:
        raise Failed("no pool is Ready")
    return pools[0]
