"""Tasks end to end: priorities, placement overrides, affinity, cancel, faults, deadlines,
full-queue policies and sessions — asserted on result files and event logs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from reconciler import clocks
from reconciler import daemon as daemons
from state import spool
from tests.conftest import Workspace, _all_ready, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow


def _slow(slots: int = 1, tokens_per_s: float = 40, **extra: Any) -> dict[str, Any]:
    cfg = config(**extra)
    cfg["pools"][0]["slots"] = slots
    cfg["pools"][0]["sim"] = {"tokens_per_s": tokens_per_s, "load_s": 0.0}
    return cfg


def _started(ws: Workspace, task_id: str) -> bool:
    return any(f.event == "started" for f in ws.frames(task_id))


async def test_interactive_tasks_start_before_earlier_batch_tasks(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow())
    await serve()
    workspace.submit("blocker.task.yaml", task("blocker", max_tokens=12))
    await wait_for(lambda: _started(workspace, "blocker"))
    workspace.submit("b1.task.yaml", task("b1", max_tokens=2))
    await wait_for(lambda: workspace.result("b1"))
    workspace.submit("b2.task.yaml", task("b2", max_tokens=2))
    await wait_for(lambda: workspace.result("b2"))
    workspace.submit("i1.task.yaml", task("i1", max_tokens=2, priority="interactive"))
    queued = await wait_for(lambda: workspace.result("i1"))
    assert queued["queue_position"] == 0  # interactive goes ahead of the batch tasks
    order = []
    for t in ("blocker", "i1", "b1", "b2"):
        r = await wait_terminal(workspace, t)
        order.append((r["timings"]["started_at"], t))
    assert [t for _, t in sorted(order)] == ["blocker", "i1", "b1", "b2"]


async def test_every_accepted_task_carries_queue_metadata(workspace: Workspace, serve: Any) -> None:
    workspace.write_config(_slow())
    await serve()
    for i in range(3):
        workspace.submit(f"q{i}.task.yaml", task(f"q{i}", max_tokens=8, deadline_ms=60000))
    for i in range(3):
        await wait_terminal(workspace, f"q{i}")
        queued = next(f for f in workspace.frames(f"q{i}") if f.event == "queued")
        assert isinstance(queued.data["queue_position"], int)
        assert isinstance(queued.data["predicted_start_ms"], int)
        metrics = [f.data for f in workspace.frames(f"q{i}") if f.event == "metrics"]
        assert metrics and all("queue_depth" in m and "on_time_probability" in m for m in metrics)
        assert 0.0 <= metrics[0]["on_time_probability"] <= 1.0
    last = next(f for f in workspace.frames("q2") if f.event == "queued")
    assert last.data["predicted_start_ms"] > 0  # two tasks were ahead of it


async def test_a_pinned_task_waits_for_its_pool_and_never_falls_back(
    workspace: Workspace, serve: Any
) -> None:
    cfg = _slow()
    cfg["pools"].append(
        {"id": "p2", "engine": "sim", "model": "m1", "slots": 1, "sim": {"tokens_per_s": 400}}
    )
    workspace.write_config(cfg)
    await serve()
    workspace.submit(
        "busy.task.yaml", task("busy", max_tokens=10, placement={"mode": "pin", "pin_pool": "p1"})
    )
    await wait_for(lambda: _started(workspace, "busy"))
    workspace.submit(
        "pinned.task.yaml",
        task(
            "pinned",
            max_tokens=2,
            placement={"mode": "pin", "pin_pool": "p1", "allow_fallback": True},
        ),
    )
    result = await wait_terminal(workspace, "pinned")
    assert result["pool_id"] == "p1"
    busy = await wait_terminal(workspace, "busy")
    assert result["timings"]["started_at"] >= busy["timings"]["finished_at"]


async def test_a_pin_to_a_pool_still_loading_waits_for_it_and_is_not_rerouted(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"].append({"id": "slowstart", "engine": "sim", "model": "m1", "sim": {"load_s": 2}})
    workspace.write_config(cfg)
    await serve(ready=False)
    await wait_for(
        lambda: any(p["id"] == "p1" and p["state"] == "Ready" for p in workspace.status()["pools"])
    )
    workspace.submit("x.task.yaml", task("x", placement={"mode": "pin", "pin_pool": "slowstart"}))
    queued = await wait_for(lambda: workspace.result("x"))
    assert queued["status"] == "queued"  # p1 has free slots, but x waits for its pin
    result = await wait_terminal(workspace, "x", timeout=15)
    assert result["status"] == "succeeded" and result["pool_id"] == "slowstart"


async def test_a_session_stays_on_its_replica_and_reports_warm_kv(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["replicas"] = 2
    workspace.write_config(cfg)
    await serve()
    workspace.submit("t1.task.yaml", task("t1", session_id="s1"))
    first = await wait_terminal(workspace, "t1")
    assert first["kv_warmth"] is False
    for i in range(2, 5):
        workspace.submit(f"t{i}.task.yaml", task(f"t{i}", session_id="s1"))
        result = await wait_terminal(workspace, f"t{i}")
        assert result["replica_id"] == first["replica_id"] and result["kv_warmth"] is True
        started = next(f for f in workspace.frames(f"t{i}") if f.event == "started")
        assert started.data["kv_warmth"] is True


async def test_canceling_a_queued_task_means_it_never_starts(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow())
    await serve()
    workspace.submit("run.task.yaml", task("run", max_tokens=20))
    workspace.submit("wait.task.yaml", task("wait", max_tokens=5))
    await wait_for(lambda: _started(workspace, "run") and workspace.result("wait"))
    spool.request_cancel(workspace.spool, "wait")
    result = await wait_terminal(workspace, "wait")
    assert result["status"] == "canceled" and result["finish_reason"] == "canceled"
    names = [f.event for f in workspace.frames("wait")]
    assert names == ["queued", "end"]
    spool.request_cancel(workspace.spool, "wait")  # idempotent: nothing changes
    await asyncio.sleep(0.5)
    assert workspace.result("wait") == result


async def test_canceling_a_streaming_task_stops_its_tokens_and_frees_the_slot(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow(tokens_per_s=30))
    await serve()
    workspace.submit("long.task.yaml", task("long", max_tokens=200))
    await wait_for(lambda: sum(f.event == "token" for f in workspace.frames("long")) >= 3)
    spool.request_cancel(workspace.spool, "long")
    result = await wait_terminal(workspace, "long")
    assert result["status"] == "canceled"
    frames = workspace.frames("long")
    assert frames[-1].event == "end" and frames[-1].data["finish_reason"] == "canceled"
    assert 3 <= result["tokens_out"] < 200
    await asyncio.sleep(0.3)
    assert workspace.frames("long") == frames  # nothing after the acknowledgement
    workspace.submit("next.task.yaml", task("next", max_tokens=3))
    assert (await wait_terminal(workspace, "next"))["status"] == "succeeded"


async def test_an_engine_dying_mid_stream_fails_the_task_with_worker_reset(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0]["sim"] = {"tokens_per_s": 200, "faults": {"die_after_tokens": 3}}
    workspace.write_config(cfg)
    await serve()
    workspace.submit("doomed.task.yaml", task("doomed", max_tokens=10))
    result = await wait_terminal(workspace, "doomed")
    assert result["status"] == "failed"
    assert result["error"]["code"] == "WORKER_RESET" and result["error"]["retriable"] is True
    assert workspace.frames("doomed")[-1].event == "error"
    await wait_for(lambda: workspace.status()["pools"][0]["replicas"][0]["restarts"] >= 1, 10)


async def test_a_deadline_that_passes_while_running_ends_the_task(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow(tokens_per_s=20))
    await serve()
    workspace.submit("late.task.yaml", task("late", max_tokens=6, deadline_ms=150))
    result = await wait_terminal(workspace, "late")
    assert result["status"] in ("failed", "rejected")
    assert result["error"]["code"] == "DEADLINE_UNMET"


async def test_an_infeasible_deadline_is_refused_at_admission(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_slow(tokens_per_s=10))
    await serve()
    workspace.submit("hopeless.task.yaml", task("hopeless", max_tokens=500, deadline_ms=100))
    result = await wait_terminal(workspace, "hopeless")
    assert result["status"] == "rejected" and result["error"]["code"] == "DEADLINE_UNMET"
    assert [f.event for f in workspace.frames("hopeless")] == ["error"]


@pytest.mark.parametrize("policy", ["reject", "drop-lru"])
async def test_a_full_queue_applies_its_policy(
    workspace: Workspace, serve: Any, policy: str
) -> None:
    workspace.write_config(_slow(tokens_per_s=20, queue={"capacity": 2, "full_policy": policy}))
    await serve()
    workspace.submit("run.task.yaml", task("run", max_tokens=30))
    await wait_for(lambda: _started(workspace, "run"))
    for name in ("old", "mid"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=2))
        await wait_for(lambda n=name: workspace.result(n))  # type: ignore[misc]
    workspace.submit("new.task.yaml", task("new", max_tokens=2))
    if policy == "reject":
        result = await wait_terminal(workspace, "new")
        assert result["status"] == "rejected"
        error = result["error"]
        assert (error["code"], error["retriable"], error["policy_label"]) == (
            "ADMISSION_REJECT",
            True,
            "reject",
        )
        assert error["retry_after_ms"] > 0
    else:
        result = await wait_terminal(workspace, "old")
        error = result["error"]
        assert (result["status"], error["code"], error["policy_label"]) == (
            "failed",
            "QUEUE_FULL_DROP_LRU",
            "drop-lru",
        )
        assert error["retriable"] is True and error["retry_after_ms"] > 0
        frames = workspace.frames("old")
        assert frames[-1].event == "error" and frames[-1].data["code"] == "QUEUE_FULL_DROP_LRU"
        assert (await wait_terminal(workspace, "new", 20))["status"] == "succeeded"


async def test_drop_lru_refusing_a_batch_task_says_so_in_its_own_words(
    workspace: Workspace, serve: Any
) -> None:
    cfg = _slow(tokens_per_s=20, queue={"capacity": 2, "full_policy": "drop-lru"})
    workspace.write_config(cfg)
    await serve()
    workspace.submit("run.task.yaml", task("run", max_tokens=30))
    await wait_for(lambda: _started(workspace, "run"))
    for name in ("i1", "i2"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=2, priority="interactive"))
        await wait_for(lambda n=name: workspace.result(n))  # type: ignore[misc]
    workspace.submit("b.task.yaml", task("b", max_tokens=2, priority="batch"))
    error = (await wait_terminal(workspace, "b"))["error"]
    assert (error["code"], error["policy_label"]) == ("ADMISSION_REJECT", "drop-lru")
    assert error["message"] == (
        "the queue is full (2 tasks, policy drop-lru): only interactive tasks wait, "
        "and a batch task never evicts one"
    )


async def test_sessions_expire_and_run_out_of_turns_on_a_fake_clock(workspace: Workspace) -> None:
    workspace.write_config(config(sessions={"ttl_s": 600, "max_turns": 2}))
    clock = clocks.FakeClock()
    d = daemons.build(daemons.Options(config_path=workspace.config_path, resync_s=0.1), clock=clock)
    job = asyncio.get_running_loop().create_task(d.run())
    try:
        for i in (1, 2, 3):
            workspace.submit(f"a{i}.task.yaml", task(f"a{i}", session_id="s-turns"))
            await wait_terminal(workspace, f"a{i}")
        assert workspace.result("a2")["status"] == "succeeded"  # type: ignore[index]
        third = workspace.result("a3")
        assert third is not None and third["error"]["code"] == "SESSION_TURNS_EXCEEDED"
        # the limit raised in orch.yaml: the session it closed opens again
        workspace.write_config(config(sessions={"ttl_s": 600, "max_turns": 4}))
        await wait_for(lambda: "max_turns: 4" in _last_good(workspace), 10, "the edit applied")
        workspace.submit("a4.task.yaml", task("a4", session_id="s-turns"))
        assert (await wait_terminal(workspace, "a4"))["status"] == "succeeded"

        workspace.submit("b1.task.yaml", task("b1", session_id="s-ttl"))
        await wait_terminal(workspace, "b1")
        clock.advance(601)
        await asyncio.sleep(0.3)  # a pass sweeps the session out
        workspace.submit("b2.task.yaml", task("b2", session_id="s-ttl"))
        expired = await wait_terminal(workspace, "b2")
        assert expired["error"]["code"] == "SESSION_EXPIRED"
        assert expired["error"]["retriable"] is True

        workspace.submit("c1.task.yaml", task("c1", session_id="s-new"))
        assert (await wait_terminal(workspace, "c1"))["status"] == "succeeded"
    finally:
        d.stop()
        await asyncio.wait_for(job, 20)


async def test_a_session_with_a_turn_running_past_its_ttl_does_not_expire(
    workspace: Workspace,
) -> None:
    """A session is in use while a task of it is queued or running: a turn that runs past the
    TTL keeps it, and the next turn, sent meanwhile, is taken."""
    workspace.write_config(_slow(tokens_per_s=20, sessions={"ttl_s": 60, "max_turns": 8}))
    clock = clocks.FakeClock()
    d = daemons.build(daemons.Options(config_path=workspace.config_path, resync_s=0.1), clock=clock)
    job = asyncio.get_running_loop().create_task(d.run())
    try:
        await wait_for(lambda: _all_ready(workspace), 15, "pools Ready")
        workspace.submit("long.task.yaml", task("long", session_id="s-busy", max_tokens=40))
        await wait_for(lambda: _started(workspace, "long"))
        clock.advance(61)
        await asyncio.sleep(0.5)  # passes sweep sessions meanwhile
        workspace.submit("next.task.yaml", task("next", session_id="s-busy", max_tokens=2))
        for task_id in ("long", "next"):
            result = await wait_terminal(workspace, task_id, 20)
            assert result["status"] == "succeeded", result
    finally:
        d.stop()
        await asyncio.wait_for(job, 20)


async def test_a_task_canceled_before_the_daemon_claimed_it_never_starts(
    workspace: Workspace, serve: Any
) -> None:
    workspace.submit("early.task.yaml", task("early"))
    spool.request_cancel(workspace.spool, "early")
    await serve()
    result = await wait_terminal(workspace, "early")
    assert result["status"] == "canceled"
    assert [f.event for f in workspace.frames("early")] == ["end"]  # never queued


async def test_a_task_the_context_fills_before_its_max_tokens_fails_saying_so(
    workspace: Workspace, serve: Any
) -> None:
    """The prompt tokenizes longer than admission estimated (one token a word here, two
    bytes a word): the engine stops when the context is full, before max_tokens. That is
    never a silent success: the task fails naming the context, with the text so far."""
    workspace.write_config(_slow(tokens_per_s=4000))
    await serve()
    prompt = "a " * 1500  # admission: 750 tokens; the engine: 1501
    workspace.submit("cut.task.yaml", task("cut", prompt=prompt, max_tokens=600))
    workspace.submit("fits.task.yaml", task("fits", prompt=prompt, max_tokens=500))
    cut = await wait_terminal(workspace, "cut", 20)
    assert cut["status"] == "failed" and cut["error"]["code"] == "INVALID_PARAMS", cut
    assert cut["error"]["message"].startswith("the context filled after 547 of max_tokens 600")
    assert "1501 prompt tokens" in cut["error"]["message"] and cut["error"]["hint"]
    assert cut["tokens_out"] == 547 and cut["text"]
    fits = await wait_terminal(workspace, "fits", 20)
    assert fits["status"] == "succeeded" and fits["tokens_out"] == 500, fits


def test_a_label_with_an_empty_name_is_refused_naming_the_line() -> None:
    from state import loading, tasks

    text = 'model: m1\nprompt: x\nmax_tokens: 1\nlabels:\n  "": x\n'
    loaded = loading.validate_text(text, tasks.TaskFile, shown="t.task.yaml", is_json=False)
    assert [str(e) for e in loaded.errors] == [
        "t.task.yaml:5:3: labels: a label's name is empty "
        "(hint: name every label, e.g. team: backend)"
    ]


def _last_good(workspace: Workspace) -> str:
    path = workspace.root / ".orch" / "last-good.yaml"
    return path.read_text() if path.is_file() else ""
