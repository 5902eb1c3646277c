"""An id freed by a refusal (or a retriable failure) and taken over by a new task: every
refused file keeps its result, the log holds one task's frames with ids that never repeat,
and a reader resuming with Last-Event-ID never takes the new task's frames for the old one's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.conftest import Workspace, task, wait_for, wait_terminal


def _log_lines(ws: Workspace, task_id: str) -> list[dict[str, Any]]:
    path = ws.root / "results" / f"{task_id}.events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_files_of_one_id_refused_in_one_pass_leave_one_result_and_one_clean_log(
    workspace: Workspace, serve: Any
) -> None:
    # delivered before the daemon starts: one batch, one pass, one group commit
    for name in ("a1", "b1", "c1"):
        workspace.submit(f"{name}.task.yaml", task("same", model="nope"))
    await serve()
    await wait_for(lambda: len(list(workspace.spool.failed.iterdir())) == 3, 10, "all filed")
    await asyncio.sleep(0.3)  # the last commit
    result = workspace.result("same")
    assert result is not None and result["status"] == "rejected"
    assert result["error"]["code"] == "MODEL_UNKNOWN"
    lines = _log_lines(workspace, "same")
    assert [line["event"] for line in lines] == ["error"], lines  # the last refusal's alone
    assert lines[0]["id"] == 3  # after the ids the two before it used


async def test_a_task_taking_over_a_refused_id_goes_on_after_its_ids(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    workspace.submit("r1.task.yaml", task("r", model="nope"))
    assert (await wait_terminal(workspace, "r"))["status"] == "rejected"
    old = _log_lines(workspace, "r")
    assert [f["id"] for f in old] == [1]
    workspace.submit("r2.task.yaml", task("r", max_tokens=3))
    done = await wait_for(
        lambda: (workspace.result("r") or {}).get("status") == "succeeded", 10, "the new task"
    )
    assert done
    frames = workspace.frames("r")
    assert frames[0].id == 2 and frames[0].event == "queued"
    assert [f.id for f in frames] == list(range(2, 2 + len(frames)))
    # a reader that saw the refusal (frame 1) and resumes gets the new task whole
    url = running.daemon.server.url if running.daemon.server else ""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/tasks/r/events", headers={"Last-Event-ID": "1"}) as response,
    ):
        body = await response.text()
    assert response.status == 200, body
    events = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("event:")]
    assert events[0] == "queued" and events[-1] == "end", events
