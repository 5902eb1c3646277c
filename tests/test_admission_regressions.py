"""Admission and placement where the pool runtime and the queue meet: tasks that arrive while
their pool loads, context sizes that differ between pools, pools that fail under queued tasks
and slot leases across an engine crash. Each test was written against a reported defect."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from plugins import interfaces
from reconciler import clocks, fleet, pools, supervision
from state import ids, spool
from tests.conftest import Workspace, config, task, wait_for, wait_terminal
from tests.orchctl_support import orchctl

pytestmark = pytest.mark.slow


def _loading(load_s: float = 0.6, **extra: Any) -> dict[str, Any]:
    cfg = config(**extra)
    cfg["pools"][0]["sim"] = {"tokens_per_s": 400, "load_s": load_s}
    return cfg


async def test_a_pinned_task_waiting_at_start_runs_once_its_pool_loads(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_loading())
    workspace.submit(
        "pinned.task.yaml", task("pinned", placement={"mode": "pin", "pin_pool": "p1"})
    )
    await serve(ready=False)
    result = await wait_terminal(workspace, "pinned", timeout=15)
    assert result["status"] == "succeeded", result["error"]
    assert result["pool_id"] == "p1"


async def test_a_deadlined_task_waiting_at_start_is_not_judged_late_before_any_estimate(
    workspace: Workspace, serve: Any
) -> None:
    workspace.write_config(_loading())
    workspace.submit("soon.task.yaml", task("soon", deadline_ms=60000))
    await serve(ready=False)
    result = await wait_terminal(workspace, "soon", timeout=15)
    assert result["status"] == "succeeded", result["error"]
    queued = next(f for f in workspace.frames("soon") if f.event == "queued")
    assert queued.data["on_time_probability"] is None or queued.data["on_time_probability"] > 0


async def test_a_long_prompt_is_placed_only_on_a_pool_whose_context_fits(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0].update(ctx=2048, slots=1)
    cfg["pools"].append(
        {"id": "p-big", "engine": "sim", "model": "m1", "ctx": 8192, "slots": 1,
         "sim": {"tokens_per_s": 400}}
    )  # fmt: skip
    workspace.write_config(cfg)
    await serve()
    long_prompt = "word " * 1600  # about 2000 tokens by the byte estimate, 1601 by the sim's
    workspace.submit(
        "long.task.yaml",
        task("long", prompt=long_prompt, max_tokens=600,
             placement={"mode": "prefer", "prefer_pools": ["p1"], "allow_fallback": True}),
    )  # fmt: skip
    workspace.submit(
        "short.task.yaml",
        task("short", placement={"mode": "prefer", "prefer_pools": ["p1"]}),
    )
    long = await wait_terminal(workspace, "long")
    assert long["status"] == "succeeded", long["error"]
    assert long["pool_id"] == "p-big"
    short = await wait_terminal(workspace, "short")
    assert short["pool_id"] == "p1"  # a task that fits still goes to the preferred pool


async def test_a_request_the_engine_refuses_fails_as_invalid_params_not_as_a_reset(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0].update(ctx=1024)
    workspace.write_config(cfg)
    await serve()
    # 2 bytes a word: the byte estimate says ~650 tokens, the engine counts 1301 (> ctx)
    workspace.submit("wordy.task.yaml", task("wordy", prompt="a " * 1300, max_tokens=4))
    result = await wait_terminal(workspace, "wordy")
    assert result["status"] == "failed"
    assert result["error"]["code"] == "INVALID_PARAMS"
    assert result["error"]["retriable"] is False
    assert "context" in result["error"]["message"]


async def test_a_queued_pinned_task_fails_when_its_pool_fails(
    workspace: Workspace, serve: Any
) -> None:
    (workspace.root / "m1.gguf").write_bytes(b"GGUF not the pinned bytes")
    cfg = _loading()
    cfg["models"]["m1"]["digest"] = "sha256:" + hashlib.sha256(b"other").hexdigest()
    workspace.write_config(cfg)
    workspace.submit(
        "pinned.task.yaml", task("pinned", placement={"mode": "pin", "pin_pool": "p1"})
    )
    await serve(ready=False)
    await wait_for(lambda: workspace.status()["pools"][0]["state"] == "Failed", 10, "Failed")
    result = await wait_terminal(workspace, "pinned", timeout=10)
    assert result["status"] in ("failed", "rejected")
    assert result["error"]["code"] == "POOL_UNAVAILABLE"
    assert result["error"]["hint"]


def test_a_late_release_from_a_crashed_process_frees_no_slot_of_its_successor(
    tmp_path: Path,
) -> None:
    clock = clocks.FakeClock()
    runtime = pools.PoolRuntime(
        plugins=cast(Any, None),
        observer=cast(Any, None),
        state_dir=tmp_path,
        config=cast(Any, None),
        clock=clock,
        wake=lambda: None,
    )
    spec = interfaces.ReplicaSpec(
        replica_id="p1-0", pool_id="p1", engine="sim", model_id="m1", model_ref="file:m1",
        model_path=None, model_size_mib=1, model_digest=None, devices=(0,), ctx=2048, slots=1,
        spec_hash="h", state_dir=tmp_path,
    )  # fmt: skip

    def handle(pid: int) -> interfaces.ReplicaHandle:
        return interfaces.ReplicaHandle(spec, pid, 1, 0.0, tmp_path / "log")

    life = supervision.ReplicaLife(ids.ReplicaId("p1-0"), now=clock.monotonic())
    life.ready(clock.monotonic())
    replica = fleet.Replica("p1-0", "p1", spec, cast(Any, None), 100, life, handle=handle(1))
    runtime.replicas["p1-0"] = replica
    old = runtime.lease("p1-0")
    runtime.crashed(replica, "killed")  # the engine died under the task
    clock.advance(5)
    replica.handle = handle(2)  # restarted: a new process, its one slot free
    replica.life.restarting(clock.monotonic())
    replica.life.ready(clock.monotonic())
    new = runtime.lease("p1-0")
    runtime.release(old)  # the dead process's stream ends late
    [candidate] = runtime.candidates()
    assert candidate.slots_busy == 1 and not candidate.feasible
    runtime.release(new)
    assert runtime.candidates()[0].slots_busy == 0


async def test_a_task_refused_for_a_full_queue_may_be_dropped_again_under_its_id(
    workspace: Workspace, serve: Any
) -> None:
    await _one_slot_busy(workspace, serve, capacity=1, busy="r0", busy_tokens=30)
    workspace.submit("r1.task.yaml", task("r1", max_tokens=2))
    workspace.submit("again.task.yaml", task("again", max_tokens=2))
    refused = await wait_terminal(workspace, "again")
    assert refused["status"] == "rejected" and refused["error"]["code"] == "ADMISSION_REJECT"
    await wait_terminal(workspace, "r1")
    retry = workspace.root / "again.task.yaml"
    retry.write_text("task_id: again\nmodel: m1\nprompt: hi\nmax_tokens: 2\n")
    ran = orchctl("submit", retry, "--config", workspace.config_path)
    assert ran.code == 0, ran.err  # not refused as a duplicate: the refusal said to retry
    await wait_for(lambda: (workspace.result("again") or {}).get("status") == "succeeded", 10)
    assert workspace.result("again")["tokens_out"] == 2  # type: ignore[index]
    frames = workspace.frames("again")
    # its own frames only, numbered on after the refusal's one (docs/contracts.md)
    assert (frames[0].event, frames[0].id) == ("queued", 2)
    assert sum(f.terminal for f in frames) == 1
    workspace.submit("again2.task.yaml", task("again", max_tokens=2))  # it ran: id kept
    await wait_for(lambda: list(workspace.spool.failed.glob("*again2*.error.json")), 10)
    assert workspace.result("again")["status"] == "succeeded"  # type: ignore[index]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"pool": "p0", "model": None}, "p0"),
        ({"placement": {"mode": "pin", "pin_pool": "p0"}}, "p0"),
    ],
)
def test_a_task_naming_a_pool_that_cannot_serve_says_so_and_names_the_pool_that_can(
    fields: dict[str, object], named: str
) -> None:
    """The pool the task chose is drained while another pool of its model is Ready: the
    refusal names the chosen pool and why, and the hint the pool that would serve it."""
    from reconciler import admission
    from state import desired, tasks

    cfg = config()
    cfg["pools"].append(dict(cfg["pools"][0], id="p0"))
    state = desired.DesiredState.model_validate(cfg)
    drained = "drained on request at 2026-11-28T04:00:00Z; POST /v1/pools/p0/reload serves it"
    views = {
        "p1": admission.PoolView("p1", "m1", "Ready", None, 2048, None),  # type: ignore[arg-type]
        "p0": admission.PoolView("p0", "m1", "Stopped", drained, 2048, None),  # type: ignore[arg-type]
    }
    one = tasks.TaskFile.model_validate(task("t", **fields))
    target = admission.Target("m1", one.pool)  # type: ignore[arg-type]
    refused = admission.check(one, target, state=state, pools=views, blocked={})
    assert refused is not None and refused.code == "POOL_UNAVAILABLE"
    assert (
        refused.message == f"pool {named!r} cannot serve model 'm1' now (p0 is Stopped: {drained})"
    )
    assert refused.hint == "pool p1 also serves 'm1': name model: m1 (not the pool) to use it"


async def test_a_placement_no_pool_can_meet_is_refused_naming_its_list(
    workspace: Workspace, serve: Any
) -> None:
    """prefer_pools naming no pool of the model (a typo), or avoid_pools avoiding every one,
    with allow_fallback false: the task could never start, so it is refused at once naming
    the list (as a pin to a pool that does not serve the model is), not queued for ever."""
    import aiohttp

    from tests.test_http_api import _url

    base = _url(await serve())
    strict = {"mode": "prefer", "allow_fallback": False}
    async with aiohttp.ClientSession() as session:
        for i, (placement, field) in enumerate(
            [
                (strict | {"prefer_pools": ["p9"]}, "placement.prefer_pools"),
                (strict | {"avoid_pools": ["p1"]}, "placement.avoid_pools"),
            ]
        ):
            body = task(f"never{i}", placement=placement)
            async with session.post(f"{base}/v1/tasks", json=body) as r:
                answer = await r.json()
                assert r.status == 400 and answer["code"] == "INVALID_PARAMS", answer
                assert answer["message"].startswith(f"{field}: "), answer
                assert "could never start" in answer["message"], answer
                assert answer["hint"] == (
                    "name a pool serving 'm1' (p1), or set placement.allow_fallback: true"
                ), answer
        # with fallback allowed the same typo only loses its preference: the task runs
        body = task("falls", placement={"mode": "prefer", "prefer_pools": ["p9"]})
        async with session.post(f"{base}/v1/tasks", json=body) as r:
            assert r.status == 202, await r.json()
    assert (await wait_terminal(workspace, "falls"))["status"] == "succeeded"


async def test_a_task_evicted_by_drop_lru_may_be_posted_again_under_its_id(
    workspace: Workspace, serve: Any
) -> None:
    """An eviction says `retriable: true` and to resubmit: the retry under the same id takes
    the id over (it was a permanent 409 while only a `rejected` result allowed that)."""
    import aiohttp

    from tests.test_http_api import _url

    cfg = config(queue={"capacity": 1, "full_policy": "drop-lru"})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    base = _url(await serve())
    async with aiohttp.ClientSession() as session:

        async def post(task_id: str, **fields: Any) -> tuple[int, dict[str, Any]]:
            body = task(task_id, priority="batch", **fields)
            async with session.post(f"{base}/v1/tasks", json=body) as r:
                return r.status, await r.json()

        assert (await post("busy", max_tokens=30))[0] == 202
        await wait_for(lambda: (workspace.result("busy") or {}).get("status") == "running", 10)
        assert (await post("old", max_tokens=2))[0] == 202
        assert (await post("new", max_tokens=2))[0] == 202  # evicts "old"
        evicted = await wait_terminal(workspace, "old")
        assert evicted["error"]["code"] == "QUEUE_FULL_DROP_LRU", evicted
        assert evicted["error"]["retriable"] is True
        await wait_terminal(workspace, "new")
        status, answer = await post("old", max_tokens=2, prompt="again")
        assert status == 202, answer
    retried = await wait_terminal(workspace, "old")
    assert retried["status"] == "succeeded" and retried["error"] is None, retried
    assert sum(f.terminal for f in workspace.frames("old")) == 1  # its log started again


async def test_a_task_refused_at_the_door_may_be_sent_again_fixed_under_its_id(
    workspace: Workspace, serve: Any
) -> None:
    """A 400 for a bad field (not retriable) tells the client what to fix: the fixed task,
    sent again under the id the client chose, runs (it was a 409: the refused task, which
    never ran, kept the id for ever). Through HTTP and through the spool alike."""
    import aiohttp

    from tests.test_http_api import _url

    base = _url(await serve())
    async with aiohttp.ClientSession() as session:

        async def post(**fields: Any) -> tuple[int, dict[str, Any]]:
            async with session.post(f"{base}/v1/tasks", json=task("fix-1", **fields)) as r:
                return r.status, await r.json()

        status, refused = await post(max_tokens=99_999)
        assert (status, refused["code"], refused["retriable"]) == (400, "INVALID_PARAMS", False)
        status, answer = await post(max_tokens=3)
        assert status == 202, answer
    fixed = await wait_terminal(workspace, "fix-1")
    assert fixed["status"] == "succeeded" and fixed["error"] is None, fixed
    frames = workspace.frames("fix-1")  # its log started again: one task's frames, on
    assert frames[0].event == "queued" and frames[0].id > 1  # after the refusal's ids
    assert [f.id for f in frames] == list(range(frames[0].id, frames[0].id + len(frames)))
    assert sum(f.terminal for f in frames) == 1
    workspace.submit("fix-2.task.yaml", task("fix-2", model="no-such-model"))
    assert (await wait_terminal(workspace, "fix-2"))["status"] == "rejected"
    workspace.submit("fix-2.task.yaml", task("fix-2", max_tokens=3))
    await wait_for(
        lambda: (workspace.result("fix-2") or {}).get("status") == "succeeded", 10, "fix-2 ran"
    )
    # a task that ran keeps its id
    status, answer = await _post_again(base, "fix-1")
    assert (status, answer["code"]) == (409, "DUPLICATE_TASK_ID"), answer


async def test_an_invalid_file_sent_again_under_a_refused_id_says_its_own_refusal(
    workspace: Workspace, serve: Any
) -> None:
    """A task file refused, "fixed" with another mistake and dropped again: the id was free
    to take over, so results/<id>.json and its log tell the second file's refusal (a script
    polling the result saw the first one's error, and the second went unsaid). The same for
    an id whose task ended with an error that said to retry."""
    await serve()
    workspace.submit("rr.task.yaml", "model: m1\nprompt: 5\nmax_tokens: 8\n")
    first = await wait_terminal(workspace, "rr")
    assert first["status"] == "rejected" and "prompt" in first["error"]["message"]
    workspace.submit("rr.task.yaml", "model: m1\nprompt: x\nmax_tokens: 8\npriority: urgent\n")

    def second() -> dict[str, Any] | None:
        result = workspace.result("rr")
        return result if result and "priority" in result["error"]["message"] else None

    result = await wait_for(second, 10, "the second refusal in results/rr.json")
    assert result["status"] == "rejected" and "prompt" not in result["error"]["message"]
    assert (workspace.root / result["source_file"]).is_file()
    assert result["source_file"] != first["source_file"]
    frames = workspace.frames("rr")  # a log of its own, on after the first one's ids
    assert [(f.id, f.event) for f in frames] == [(2, "error")]
    assert "priority" in frames[0].data["message"]
    # a task that ran keeps its id: a bad file sent under it is refused, the result stays
    workspace.submit("ok.task.yaml", task("ok", max_tokens=2))
    assert (await wait_terminal(workspace, "ok"))["status"] == "succeeded"
    workspace.submit("ok.task.yaml", "model: m1\nprompt: 5\nmax_tokens: 8\n")
    await wait_for(lambda: len(list(workspace.spool.failed.glob("*ok.task.yaml"))) == 1, 10)
    assert workspace.result("ok")["status"] == "succeeded"  # type: ignore[index]


async def _post_again(base: str, task_id: str) -> tuple[int, dict[str, Any]]:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/tasks", json=task(task_id, max_tokens=3)) as r,
    ):
        return r.status, await r.json()


async def test_a_capacity_lowered_below_the_queue_says_so_and_advises_a_later_retry(
    workspace: Workspace, serve: Any
) -> None:
    cfg = await _one_slot_busy(workspace, serve, capacity=16, busy="busy", busy_tokens=20)
    for i in range(6):
        workspace.submit(f"w{i}.task.yaml", task(f"w{i}", max_tokens=20))
    await wait_for(lambda: workspace.status()["queue"]["depth"] == 6, 10, "six waiting")
    first = await _refused_now(workspace, "early")  # capacity 16: not refused
    assert first is None
    cfg["queue"]["capacity"] = 2
    workspace.write_config(cfg)
    await wait_for(lambda: workspace.status()["queue"]["capacity"] == 2, 10, "capacity 2")
    refused = await _refused_now(workspace, "late")
    assert refused is not None
    assert "7 tasks wait, over its capacity of 2" in refused["message"], refused
    # five places must free before one is its: each is a task of about a second here
    assert refused["retry_after_ms"] >= 4000, refused


async def _refused_now(workspace: Workspace, task_id: str) -> dict[str, Any] | None:
    workspace.submit(f"{task_id}.task.yaml", task(task_id, max_tokens=2))
    result = await wait_for(
        lambda: (r := workspace.result(task_id)) and r["status"] in ("queued", "rejected") and r,
        10,
        f"{task_id} admitted or refused",
    )
    return result["error"] if result["status"] == "rejected" else None


async def _one_slot_busy(
    workspace: Workspace, serve: Any, *, capacity: int, busy: str, busy_tokens: int
) -> dict[str, Any]:
    """A daemon whose one slow slot (20 tokens/s) runs task `busy`; the config written."""
    cfg = config(queue={"capacity": capacity, "full_policy": "reject"})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    workspace.submit(f"{busy}.task.yaml", task(busy, max_tokens=busy_tokens))
    await wait_for(lambda: (workspace.result(busy) or {}).get("status") == "running", 10)
    return cfg


async def test_a_burst_over_the_capacity_is_refused_as_a_full_queue_not_a_lowered_one(
    workspace: Workspace, serve: Any
) -> None:
    """A burst landing on idle slots fills the queue past its capacity by the tasks those
    slots take at once (they hold no place in it): the tasks refused past both are told so,
    not that orch.yaml lowered the capacity, which nobody edited."""
    cfg = config(queue={"capacity": 3, "full_policy": "reject"})
    cfg["pools"][0].update(slots=2, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    _land_at_once(workspace, [task(f"b{i}", max_tokens=20) for i in range(12)])
    results = [
        await wait_for(
            lambda i=i: (r := workspace.result(f"b{i}")) and r["status"] != "pending" and r,
            10,
            f"b{i} admitted or refused",
        )
        for i in range(12)
    ]
    refused = [r["error"]["message"] for r in results if r["status"] == "rejected"]
    assert len(refused) == 12 - 3 - 2, results  # the queue's 3, and the 2 idle slots' 2
    for message in refused:
        assert "lowered" not in message and message.startswith("the queue is full"), message
    assert any("2 more of this burst are starting on idle slots" in m for m in refused), refused
    for r in results:  # the delay itself, for a reader of the hint (orchctl prints it)
        if r["status"] == "rejected":
            seconds = -(-r["error"]["retry_after_ms"] // 1000)
            assert f"retry in {seconds} s or raise queue.capacity" in r["error"]["hint"], r


async def test_a_prompt_that_alone_fills_the_context_is_blamed_not_max_tokens(
    workspace: Workspace, serve: Any
) -> None:
    """A prompt longer than the slot's context was refused as `max_tokens` at fault (`lower
    max_tokens`), though the client sent none over: the prompt is named, with its fix."""
    cfg = config()
    cfg["pools"][0]["ctx"] = 1024
    workspace.write_config(cfg)
    await serve()
    workspace.submit("long.task.yaml", task("long", prompt="word " * 2000, max_tokens=1))
    refused = await wait_terminal(workspace, "long")
    assert refused["status"] == "rejected", refused
    assert refused["error"]["message"].startswith("prompt: about 2500 tokens, more than"), refused
    assert "max_tokens" not in refused["error"]["hint"], refused
    chat = [{"role": "user", "content": "word " * 2000}]
    workspace.submit("chat.task.yaml", task("chat", prompt=None, messages=chat, max_tokens=1))
    refused = await wait_terminal(workspace, "chat")
    assert refused["error"]["message"].startswith("messages: about"), refused


async def test_a_burst_is_told_its_places_among_the_tasks_that_will_wait(
    workspace: Workspace, serve: Any
) -> None:
    """Four tasks landing at once on two idle slots: two start at once and hold no place, so
    the other two are first and second to wait (positions 0 and 1), not 2 and 3."""
    cfg = config()
    cfg["pools"][0].update(slots=2, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    await serve()
    _land_at_once(workspace, [task(f"qp{i}", max_tokens=20) for i in range(4)])
    for i in range(4):
        await wait_for(lambda i=i: workspace.frames(f"qp{i}"), 10, f"qp{i} queued")
    places = sorted(workspace.frames(f"qp{i}")[0].data["queue_position"] for i in range(4))
    assert places == [0, 0, 0, 1], places


def _land_at_once(workspace: Workspace, bodies: list[dict[str, Any]]) -> None:
    """Task files written into spool/tmp, then renamed into incoming/ in one tight loop: a
    burst that lands at once, however the daemon batches its arrivals."""
    staged = []
    for body in bodies:
        staged.append(workspace.spool.tmp / f"{body['task_id']}.task.yaml")
        staged[-1].write_text(yaml.safe_dump(body))
    for path in staged:
        path.rename(workspace.spool.incoming / path.name)


async def test_a_task_whose_cancel_waits_ends_canceled_even_when_the_queue_is_full(
    workspace: Workspace, serve: Any
) -> None:
    """A cancel request already in spool/cancel/ when its task is taken (written before the
    task file, or acknowledged by a daemon killed before the canceled result was durable,
    whose successor takes the task again): the task ends canceled, before any admission
    check, never rejected for a queue that is full by then."""
    await _one_slot_busy(workspace, serve, capacity=1, busy="busy", busy_tokens=40)
    workspace.submit("waits.task.yaml", task("waits", max_tokens=2))  # fills the queue
    await wait_for(lambda: (workspace.result("waits") or {}).get("status") == "queued", 10)
    spool.request_cancel(workspace.spool, "victim")
    workspace.submit("victim.task.yaml", task("victim", max_tokens=2))
    ended = await wait_terminal(workspace, "victim")
    assert ended["status"] == "canceled", ended
    assert ended["finish_reason"] == "canceled" and ended["error"] is None
    await wait_for(lambda: not (workspace.spool.cancel / "victim").exists(), 10, "consumed")
    assert (workspace.spool.done / "victim.task.yaml").exists()
    frames = workspace.frames("victim")
    assert [f.event for f in frames] == ["end"] and frames[0].data["finish_reason"] == "canceled"
    assert (workspace.result("waits") or {}).get("status") in ("queued", "running", "succeeded")


async def test_each_pool_holds_to_its_own_max_tokens(workspace: Workspace, serve: Any) -> None:
    """A pool's max_tokens is its own: a task over one pool's limit is admitted when another
    pool of its model has none (or a higher one) and runs there, never on the limited pool;
    over every pool's limit it is refused naming the largest."""
    cfg = config()
    cfg["pools"][0].update(max_tokens=5, slots=2)
    cfg["pools"].append(
        {"id": "p-long", "engine": "sim", "model": "m1", "ctx": 2048, "slots": 1,
         "sim": {"tokens_per_s": 400}}
    )  # fmt: skip
    workspace.write_config(cfg)
    await serve()
    workspace.submit("long.task.yaml", task("long", max_tokens=12))
    workspace.submit("short.task.yaml", task("short", max_tokens=3))
    long = await wait_terminal(workspace, "long")
    assert long["status"] == "succeeded", long["error"]
    assert long["pool_id"] == "p-long" and long["tokens_out"] == 12
    assert (await wait_terminal(workspace, "short"))["status"] == "succeeded"

    cfg["pools"][1]["max_tokens"] = 10
    workspace.write_config(cfg)
    await wait_for(
        lambda: "max_tokens: 10" in (workspace.root / ".orch" / "last-good.yaml").read_text(),
        10,
        "the edit applied",
    )
    workspace.submit("over.task.yaml", task("over", max_tokens=12))
    over = await wait_terminal(workspace, "over")
    assert over["status"] == "rejected" and over["error"]["code"] == "INVALID_PARAMS"
    assert "max_tokens: 12 is over the pool limit 10" in over["error"]["message"], over


async def test_an_idle_slot_another_pool_has_does_not_make_room_for_pinned_tasks(
    workspace: Workspace, serve: Any
) -> None:
    """Pool `busy` runs a task, pool `idle` (same model) has a free slot. Tasks pinned to
    `busy` all wait: the full queue counts them (capacity 2: two queued, the rest refused,
    their places 0 and 1), while a plain task the idle slot takes at once is never refused."""
    cfg = config(queue={"capacity": 2, "full_policy": "reject"})
    slow = cfg["pools"][0] | {"id": "busy", "slots": 1, "sim": {"tokens_per_s": 20, "load_s": 0}}
    cfg["pools"] = [slow, slow | {"id": "idle", "sim": dict(slow["sim"])}]
    workspace.write_config(cfg)
    await serve()
    pin = {"mode": "pin", "pin_pool": "busy"}
    workspace.submit("run.task.yaml", task("run", max_tokens=60, placement=pin))
    await wait_for(lambda: (workspace.result("run") or {}).get("status") == "running", 10)
    for name in ("w1", "w2", "w3", "w4"):
        workspace.submit(f"{name}.task.yaml", task(name, max_tokens=3, placement=pin))
    for name in ("w1", "w2", "w3", "w4"):
        await wait_for(lambda name=name: workspace.result(name), 10, name)
    results = {name: workspace.result(name) or {} for name in ("w1", "w2", "w3", "w4")}
    assert [results[n]["status"] for n in ("w1", "w2")] == ["queued", "queued"], results
    assert [results[n]["queue_position"] for n in ("w1", "w2")] == [0, 1], results
    for name in ("w3", "w4"):
        assert results[name]["status"] == "rejected", results[name]
        assert results[name]["error"]["code"] == "ADMISSION_REJECT"
        assert "starting on idle slots" not in results[name]["error"]["message"]
    workspace.submit("free.task.yaml", task("free", max_tokens=3))
    free = await wait_terminal(workspace, "free")
    assert free["status"] == "succeeded" and free["pool_id"] == "idle", free


@pytest.mark.parametrize(
    ("placement", "pb", "code"),
    [
        ({"mode": "prefer", "prefer_pools": ["pb"], "allow_fallback": False}, {}, "INVALID_PARAMS"),
        ({"mode": "auto", "avoid_pools": ["pa"], "allow_fallback": False}, {}, "INVALID_PARAMS"),
        (
            {"mode": "prefer", "prefer_pools": ["pb"], "allow_fallback": False},
            {"replicas": 0},
            "POOL_UNAVAILABLE",
        ),
    ],
)
async def test_a_placement_without_fallback_is_judged_on_the_pools_it_allows(
    workspace: Workspace, serve: Any, placement: dict[str, Any], pb: dict[str, Any], code: str
) -> None:
    """prefer/avoid without a fallback leave the task pb alone: a max_tokens over pb's
    limit, or pb scaled to zero, is refused at admission, as for a pin, instead of a task
    queued for ever that pa (which would run it) may never take."""
    cfg = config()
    pa = cfg["pools"][0] | {"id": "pa", "sim": {"tokens_per_s": 400, "load_s": 0}}
    cfg["pools"] = [pa, pa | {"id": "pb", "max_tokens": 10, "sim": dict(pa["sim"])} | pb]
    workspace.write_config(cfg)
    await serve(ready=not pb)
    await wait_for(lambda: _pool_state(workspace, "pa") == "Ready", 15, "pa Ready")
    workspace.submit("t.task.yaml", task("t", max_tokens=20, placement=placement))
    refused = await wait_terminal(workspace, "t")
    assert refused["status"] == "rejected" and refused["error"]["code"] == code, refused
    if code == "POOL_UNAVAILABLE":
        assert "no pool its placement allows (pb)" in refused["error"]["message"], refused
        assert "allow_fallback: true" in refused["error"]["hint"], refused
    workspace.submit("fits.task.yaml", task("fits", max_tokens=20))  # pa runs it
    assert (await wait_terminal(workspace, "fits"))["pool_id"] == "pa"


async def test_a_pinned_task_failed_by_its_pool_scaled_to_zero_says_orch_yaml_changed(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config()
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0})
    workspace.write_config(cfg)
    await serve()
    pin = {"mode": "pin", "pin_pool": "p1"}
    workspace.submit("run.task.yaml", task("run", max_tokens=60, placement=pin))
    await wait_for(lambda: (workspace.result("run") or {}).get("status") == "running", 10)
    workspace.submit("wait.task.yaml", task("wait", max_tokens=3, placement=pin))
    await wait_for(lambda: (workspace.result("wait") or {}).get("status") == "queued", 10)
    cfg["pools"][0]["replicas"] = 0
    workspace.write_config(cfg)
    failed = await wait_terminal(workspace, "wait")
    assert failed["error"]["code"] == "POOL_UNAVAILABLE", failed
    assert failed["error"]["message"].endswith("(orch.yaml changed while the task waited)")


def _pool_state(ws: Workspace, pool_id: str) -> str | None:
    try:
        pools = ws.status()["pools"]
    except (OSError, ValueError):
        return None
    return next((p["state"] for p in pools if p["id"] == pool_id), None)


def test_an_unknown_or_retired_model_is_told_the_models_a_task_can_run_on() -> None:
    """The hint names only the models a task may name and run (Active, with a pool): a
    Retired model is refused, one without a pool too."""
    from reconciler import admission
    from state import desired, tasks

    cfg = config()
    cfg["models"]["spare"] = {"ref": "file:spare.gguf", "size_mib": 1000}  # no pool
    state = desired.DesiredState.model_validate(cfg)
    views = {"p1": admission.PoolView("p1", "m1", "Ready", None, 2048, None)}  # type: ignore[arg-type]
    hints = {}
    for model in ("gpt-4o", "old"):
        one = tasks.TaskFile.model_validate(task("t", model=model))
        refused = admission.check(
            one,
            admission.Target(model, None),
            state=state,
            pools=views,
            blocked={},  # type: ignore[arg-type]
        )
        assert refused is not None
        hints[refused.code] = refused.hint
    assert hints == {
        "MODEL_UNKNOWN": "use one of: m1",
        "MODEL_RETIRED": "use one of: m1, or set its state: Active",
    }
    cfg["pools"] = []
    bare = desired.DesiredState.model_validate(cfg)
    one = tasks.TaskFile.model_validate(task("t", model="gpt-4o"))
    refused = admission.check(one, admission.Target("gpt-4o", None), state=bare, pools={})  # type: ignore[arg-type]
    assert refused is not None and refused.hint.startswith("no model of orch.yaml is served")
