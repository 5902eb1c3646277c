"""A slot freed by a task that ended well takes the next queued task at once, not at the next
full pass; a stopping daemon lets running tasks drain and starts nothing more."""

from __future__ import annotations

import asyncio
import itertools
from datetime import datetime
from typing import Any

import pytest

from reconciler import dispatch, pools
from tests.conftest import Workspace, config, task, wait_for, wait_terminal


def _one_slot(tokens_per_s: float) -> dict[str, Any]:
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": tokens_per_s, "load_s": 0.0})
    return cfg


def _at(frame: Any) -> float:
    return datetime.fromisoformat(frame.ts.replace("Z", "+00:00")).timestamp()


async def test_a_freed_slot_takes_the_next_task_without_waiting_for_a_pass(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every full pass is made slow (its look at the replicas takes a second). Five tasks on
    one slot still run back to back: each starts well within that of the previous one's end."""
    workspace.write_config(_one_slot(400))
    await serve()
    real = pools.PoolRuntime.reconcile

    async def slow(self: pools.PoolRuntime) -> Any:
        await asyncio.sleep(1.0)
        return await real(self)

    monkeypatch.setattr(pools.PoolRuntime, "reconcile", slow)
    ids = [f"r{i}" for i in range(5)]
    for task_id in ids:
        workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=2))
    for task_id in ids:
        assert (await wait_terminal(workspace, task_id, 30))["status"] == "succeeded"
    spans = []
    for task_id in ids:
        frames = workspace.frames(task_id)
        started = next(f for f in frames if f.event == "started")
        spans.append((_at(started), _at(frames[-1])))
    spans.sort()
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)]
    assert max(gaps) < 0.5, gaps


async def test_a_stopping_daemon_drains_running_tasks_and_starts_no_queued_one(
    workspace: Workspace, serve: Any
) -> None:
    """A stop while one task runs and two wait: the running one finishes (drain), and its end
    hands its slot to nobody; the waiting ones never start, so they re-run at the next start
    as their first attempt."""
    workspace.write_config(_one_slot(40))  # 8 tokens: about 0.2 s
    running = await serve()
    for task_id in ("first", "second", "third"):
        workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=8))
    await wait_for(
        lambda: (workspace.result("first") or {}).get("status") == "running", 10, "first runs"
    )
    assert await running.stop() == 0
    assert workspace.result("first")["status"] == "succeeded"  # type: ignore[index]
    for task_id in ("second", "third"):
        assert workspace.result(task_id)["status"] == "queued"  # type: ignore[index]
        assert [f.event for f in workspace.frames(task_id)] == ["queued"]
        assert (workspace.spool.active / f"{task_id}.task.yaml").exists()


async def test_a_failure_to_place_at_a_tasks_end_leaves_that_task_succeeded(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing the next task right at a task's end fails (a bug): the ended task keeps its
    succeeded result, and the next pass places the waiting task."""
    workspace.write_config(_one_slot(400))
    await serve()
    real = dispatch.Dispatcher.pump

    def pump(self: dispatch.Dispatcher, *, recheck: bool = True) -> None:
        if not recheck:
            raise RuntimeError("a bug in placing")
        real(self, recheck=recheck)

    monkeypatch.setattr(dispatch.Dispatcher, "pump", pump)
    for task_id in ("a", "b"):
        workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=2))
    for task_id in ("a", "b"):
        assert (await wait_terminal(workspace, task_id, 10))["status"] == "succeeded"
