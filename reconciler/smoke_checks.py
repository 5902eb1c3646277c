"""The checks of the home reference smoke (HME-040), each over the daemon's HTTP API; run by
`cli_smoke` in the order of `CHECKS`, each through `smoke_harness.run`.

A check takes the run's `smoke_harness.Smoke` and returns what it saw, or raises
`smoke_harness.Failed` (with why) or `smoke_harness.NotRun` (with why: the daemon does not
offer the route, by name, or the workstation lacks what the check needs, such as GPUs of two
sizes). Tasks it submits carry `labels: {suite: smoke}` and ids starting with
`smoke-<run>-`, and every task it leaves behind (the queue it fills for the 429) is canceled.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import Any

from reconciler import api_client, cli_determinism, determinism, smoke_harness
from reconciler.smoke_harness import Failed, NotRun, Smoke

MAX_FILL = 600  # a queue that needs more tasks than this to fill is not filled by a smoke
DROPPED = "QUEUE_FULL_DROP_LRU"


def streams(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/tasks", "GET /v1/tasks/{task_id}/events")
    pool = smoke_harness.first_pool(smoke)
    body = smoke.task("stream", pool["model"])
    answer = smoke.client.post("/v1/tasks", body)
    if answer.status != 202:
        raise Failed(f"POST /v1/tasks answered {answer.said()}")
    frames = smoke.follow(body["task_id"])
    names = [f.event for f in frames]
    tokens = [f for f in frames if f.event == "token"]
    if names[:2] != ["queued", "started"] or not tokens or names[-1] != "end":
        raise Failed(f"{body['task_id']} streamed {', '.join(dict.fromkeys(names))}")
    if [f.data.get("i") for f in tokens] != list(range(len(tokens))):
        raise Failed(f"{body['task_id']}: token indices are not 0, 1, 2, …")
    result = smoke.result(body["task_id"])
    timings = result.get("timings") or {}
    return (
        f"queued → started → {len(tokens)} tokens → end ({frames[-1].data.get('finish_reason')}) "
        f"on {result.get('replica_id')}, {cli_determinism.gpu_name(result.get('gpu'))}; "
        f"first token {timings.get('first_token_ms')} ms after the start"
    )


def placement(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "GET /v1/status", "POST /v1/tasks")
    gpus = smoke.refresh().get("gpus", [])
    sizes = {g["vram_total_mib"] for g in gpus}
    if len(gpus) < 2 or len(sizes) < 2:
        raise NotRun(
            f"the daemon shows {len(gpus)} GPU(s) of {len(sizes)} size(s); mixed-VRAM placement "
            "needs GPUs of two sizes"
        )
    pools = smoke.ready_pools()
    if not pools:
        raise Failed("no pool is Ready")
    stuck = [
        f"{p['id']} is {p['state']}: {p.get('reason') or '-'}"
        for p in smoke.status["pools"]
        if p["state"] in ("Failed", "Unschedulable")
    ]
    if stuck:  # placement left a pool without its replicas
        raise Failed("; ".join(stuck))
    on = {i for p in pools for r in p["replicas"] if r["state"] == "Ready" for i in r["gpu"]}
    if len(on) < 2:
        raise NotRun(
            f"every Ready replica is on GPU {', '.join(map(str, sorted(on))) or '-'}: nothing "
            "was placed across GPUs of mixed VRAM (the pools' models and sizes fit one card)"
        )
    # what the daemon placed, by VRAM: every GPU holds what it was given
    load: dict[int, float] = {}
    for p in smoke.status["pools"]:
        for r in p["replicas"]:
            for index in r["gpu"]:
                load[index] = load.get(index, 0) + r["vram_estimated_mib"] / max(1, len(r["gpu"]))
    for g in gpus:
        if load.get(g["index"], 0) > g["vram_total_mib"]:
            raise Failed(
                f"GPU {g['index']} holds replicas estimated at {load[g['index']]:.0f} MiB, "
                f"more than its {g['vram_total_mib']} MiB"
            )
    # unpinned tasks, as many per model as its Ready replicas have slots, all at once
    models = sorted({p["model"] for p in pools})
    bodies = []
    for model in models:
        slots = sum(
            r["slots_total"]
            for p in pools
            if p["model"] == model
            for r in p["replicas"]
            if r["state"] == "Ready"
        )
        bodies += [smoke.task("place", model, max_tokens=64) for _ in range(max(1, min(slots, 8)))]
    for body in bodies:
        answer = smoke.client.post("/v1/tasks", body)
        if answer.status != 202:
            raise Failed(f"unpinned task for {body['model']}: POST answered {answer.said()}")
    where: dict[str, set[str]] = {}
    for body in bodies:
        smoke.follow(body["task_id"])
        result = smoke.result(body["task_id"])
        if result.get("status") != "succeeded":
            raise Failed(f"{body['task_id']} ended {result.get('status')}: {result.get('error')}")
        gpu = cli_determinism.gpu_name(result.get("gpu")) or "?"
        where.setdefault(gpu, set()).add(str(result.get("pool_id")))
    used = ", ".join(f"{gpu}: {', '.join(sorted(p))}" for gpu, p in sorted(where.items()))
    placed = ", ".join(f"{p['id']} ({p['model']}) on GPU {_devices(p)}" for p in pools)
    return (
        f"{len(gpus)} GPUs of {len(sizes)} sizes; replicas placed {placed}, within every GPU's "
        f"VRAM; {len(bodies)} unpinned tasks succeeded, served by {used}"
    )


def _devices(pool: dict[str, Any]) -> str:
    return "+".join(sorted({str(i) for r in pool["replicas"] for i in r["gpu"]}))


CANCEL_TRIES = 3  # tasks (each its own seed) a model that ends its answers early is given


def cancel(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/tasks", "POST /v1/tasks/{task_id}/cancel")
    pool = smoke_harness.first_pool(smoke)
    limit = smoke.long_tokens(pool["id"])
    ended_first: list[str] = []
    for attempt in range(CANCEL_TRIES):
        said = _cancel_one(smoke, pool, limit, seed=attempt + 1)
        if said.startswith("canceled"):
            return said
        ended_first.append(said)
    # the model answered whole, each time, before the cancel reached it: not the daemon's
    # failure, and nothing this check can show with this model
    raise NotRun(
        f"the model ended each of {CANCEL_TRIES} tasks on its own before the cancel reached it "
        f"({'; '.join(ended_first)}); run the smoke with a model that writes longer answers"
    )


def _cancel_one(smoke: Smoke, pool: dict[str, Any], limit: int, *, seed: int) -> str:
    """One task canceled at its first token: what happened, starting with "canceled"; else
    how it ended on its own first (raises Failed for what the daemon did wrong)."""
    body = smoke.task("cancel", pool["model"], max_tokens=limit, seed=seed)
    answer = smoke.client.post("/v1/tasks", body)
    if answer.status != 202:
        raise Failed(f"POST /v1/tasks answered {answer.said()}")
    task_id = body["task_id"]
    before, asked, terminal = 0, None, None
    for frame in smoke.client.frames(task_id):
        if frame.event == "token" and asked is None:
            before += 1
            asked = time.monotonic()
            sent = smoke.client.post(f"/v1/tasks/{task_id}/cancel")
            if sent.status not in (200, 202):
                raise Failed(f"POST cancel answered {sent.said()}")
        terminal = frame
    stopped_ms = (time.monotonic() - (asked or time.monotonic())) * 1000
    time.sleep(0.5)  # nothing may follow the terminal frame
    again = smoke.follow(task_id)
    result = smoke.result(task_id)
    if _stopped_early(result) and result.get("tokens_out", 0) < limit:
        timings = result.get("timings") or {}
        return (
            f"{task_id} stopped by itself after {result.get('tokens_out')} tokens in "
            f"{timings.get('decode_time_ms')} ms"
        )
    if result.get("status") != "canceled":
        raise Failed(f"{task_id} ended {result.get('status')}, not canceled")
    if terminal is None or again[-1].id != terminal.id or result.get("tokens_out", 0) >= limit:
        raise Failed(f"tokens kept coming after the cancel of {task_id}")
    return (
        f"canceled after {result.get('tokens_out')} of {limit} tokens; the stream ended "
        f"{stopped_ms:.0f} ms after the request with "
        f"{terminal.event} ({terminal.data.get('finish_reason') or terminal.data.get('code')}), "
        "nothing after it"
    )


def backpressure(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/tasks", "POST /v1/tasks/{task_id}/cancel")
    queue = smoke.refresh().get("queue", {})
    pools = smoke.ready_pools()
    if not pools:
        raise Failed("no pool is Ready")
    slots = sum(r["slots_total"] for p in pools for r in p["replicas"] if r["state"] == "Ready")
    need = int(queue.get("capacity", 0)) + slots + 1
    if need > MAX_FILL:
        raise NotRun(
            f"filling a queue of capacity {queue.get('capacity')} takes {need} tasks, more than "
            f"the smoke's {MAX_FILL}; run it against an orch.yaml with a smaller queue.capacity"
        )
    pool = pools[0]
    submitted: list[str] = []
    refused: api_client.Answer | None = None
    try:
        for _ in range(need + 4):  # + a few: tasks may finish while the queue fills
            body = smoke.task("fill", pool["model"], max_tokens=smoke.long_tokens(pool["id"]))
            body["priority"] = "batch"
            answer = smoke.client.post("/v1/tasks", body)
            if answer.status == 202:
                submitted.append(body["task_id"])
            elif answer.status == 429:
                refused = answer
                break
            else:
                raise Failed(f"POST /v1/tasks answered {answer.said()} while filling the queue")
        evicted = [] if refused else [t for t in submitted if _code(smoke.result(t)) == DROPPED]
    finally:
        for task_id in submitted:
            smoke.client.post(f"/v1/tasks/{task_id}/cancel")
        # the next check starts with an empty queue
        smoke.until("the canceled tasks to end", lambda: all(_ended(smoke, t) for t in submitted))
    if refused is not None:
        envelope = refused.json or {}
        retry = refused.headers.get("retry-after")
        if not envelope.get("retriable") or not retry:
            raise Failed(f"the 429 lacks retriable or Retry-After: {refused.said()}")
        return (
            f"after {len(submitted)} tasks (capacity {queue.get('capacity')}, {slots} slots) the "
            f"next POST got 429 {envelope.get('code')}, Retry-After {retry} s, "
            f"retry_after_ms {envelope.get('retry_after_ms')}; the {len(submitted)} tasks were "
            "canceled"
        )
    if evicted:
        return (
            f"the queue (policy {queue.get('full_policy')}) evicted {len(evicted)} task(s) with "
            "QUEUE_FULL_DROP_LRU (429 in the error table) once full; the rest were canceled"
        )
    stopped = [t for t in submitted if _stopped_early(smoke.result(t))]
    if stopped and len(stopped) == len([t for t in submitted if _ended_well(smoke.result(t))]):
        # every task that ended did so by itself, well short of its max_tokens: the model
        # answers faster than tasks can be sent, so no queue fills (not the daemon's doing)
        raise NotRun(
            f"the model ended {len(stopped)} of the {len(submitted)} tasks on its own (short "
            "answers, faster than tasks could be sent), so the queue never filled; run the "
            "smoke with a model that writes longer answers, or a smaller queue.capacity"
        )
    raise Failed(f"{len(submitted)} tasks filled no queue: no 429 and no eviction")


def _ended_well(result: dict[str, Any]) -> bool:
    return result.get("status") == "succeeded"


def _stopped_early(result: dict[str, Any]) -> bool:
    """Whether the task ended by the model's own end (EOS, a stop string), not its limit."""
    return _ended_well(result) and result.get("finish_reason") == "stop"


def _ended(smoke: Smoke, task_id: str) -> bool:
    return smoke.result(task_id).get("status") in ("succeeded", "failed", "canceled", "rejected")


def _code(result: dict[str, Any]) -> str | None:
    error = result.get("error")
    return error.get("code") if isinstance(error, dict) else None


def catalog_verify(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "GET /v1/catalog/models", "POST /v1/catalog/models/{model_id}/verify")
    listed = smoke.client.get("/v1/catalog/models")
    if listed.status != 200:
        raise Failed(f"GET /v1/catalog/models answered {listed.said()}")
    present = [m for m in listed.json["models"] if m.get("exists")]
    if not present:
        raise NotRun("no model of orch.yaml has its file on disk to verify")
    seen, bad = [], []
    for model in present:
        answer = smoke.client.post(f"/v1/catalog/models/{model['id']}/verify", timeout_s=900)
        record = answer.json or {}
        if answer.status != 200:
            bad.append(f"{model['id']}: verify answered {answer.said()}")
            continue
        seen.append(f"{model['id']} {record.get('status')} in {record.get('took_ms')} ms")
        if record.get("status") == "fail":
            bad.append(f"{model['id']}: {record.get('message')}")
    if bad:
        raise Failed("; ".join(bad))
    return f"verified {len(seen)} model file(s): " + ", ".join(seen)


def artifact(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/artifacts", "GET /v1/artifacts/{artifact_id}")
    document = {
        "kind": "summary",
        "content": {"smoke": smoke.run_id, "note": "reference smoke upload"},
        "tags": ["smoke", f"run:{smoke.run_id}"],
    }
    first = smoke.client.post("/v1/artifacts", document)
    if first.status not in (200, 201):
        raise Failed(f"POST /v1/artifacts answered {first.said()}")
    artifact_id = first.json["id"]
    got = smoke.client.get(f"/v1/artifacts/{artifact_id}")
    digest = "sha256:" + hashlib.sha256(got.raw).hexdigest()
    if got.status != 200 or digest != artifact_id:
        raise Failed(f"GET {artifact_id} answered {got.status} with a body of digest {digest}")
    again = smoke.client.post("/v1/artifacts", document)
    if again.status != 200 or again.json.get("id") != artifact_id:
        raise Failed(f"the same document again answered {again.said()}, not 200 with its id")
    return (
        f"uploaded {artifact_id[:19]}… ({first.status}, {first.json.get('size_bytes')} bytes); "
        "the download's sha256 is its id; the same upload again answered 200 with the same id"
    )


def drain_reload(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/pools/{pool_id}/drain", "POST /v1/pools/{pool_id}/reload")
    # an idle pool where there is one: a drain ends the tasks still running after its deadline,
    # and the smoke must not end someone else's work
    pools = smoke.ready_pools()
    idle = [p for p in pools if not any(r.get("slots_busy") for r in p.get("replicas", []))]
    pool = (idle or pools or [smoke_harness.first_pool(smoke)])[0]
    pid = pool["id"]
    busy = sum(r.get("slots_busy", 0) for r in pool.get("replicas", []))

    def state() -> str | None:
        return next((p["state"] for p in smoke.refresh()["pools"] if p["id"] == pid), None)

    began = time.monotonic()
    # every Ready pool busy: give its running tasks the longest drain a user would allow
    deadline_ms = 2000 if not busy else 60_000
    answer = smoke.client.post(f"/v1/pools/{pid}/drain", {"deadline_ms": deadline_ms})
    if answer.status not in (200, 202):
        raise Failed(f"drain of {pid} answered {answer.said()}")
    try:
        return _drained(smoke, pool, state, began, busy)
    finally:  # whatever happened (a failed check, Ctrl-C), the pool is served again
        with contextlib.suppress(Exception):  # a daemon gone: nothing left to restore
            if state() == "Stopped":
                smoke.client.post(
                    f"/v1/pools/{pid}/reload", {}, timeout_s=smoke_harness.WAIT_S + 600
                )


def _drained(
    smoke: Smoke,
    pool: dict[str, Any],
    state: Callable[[], str | None],
    began: float,
    busy: int,
) -> str:
    pid = pool["id"]
    smoke.until(f"pool {pid} Stopped after the drain", lambda: state() == "Stopped")
    drained_ms = (time.monotonic() - began) * 1000
    refused = smoke.client.post(
        "/v1/tasks",
        smoke.task("drained", pool["model"], placement={"mode": "pin", "pin_pool": pid}),
    )
    if refused.status != 503:
        raise Failed(f"a task pinned to drained {pid} answered {refused.said()}, not 503")
    began = time.monotonic()
    reloaded = smoke.client.post(
        f"/v1/pools/{pid}/reload", {}, timeout_s=smoke_harness.WAIT_S + 600
    )
    if reloaded.status != 200:
        raise Failed(f"reload of {pid} answered {reloaded.said()}")
    smoke.until(f"pool {pid} Ready after the reload", lambda: state() == "Ready")
    reload_ms = (time.monotonic() - began) * 1000
    body = smoke.task("reloaded", pool["model"], placement={"mode": "pin", "pin_pool": pid})
    if smoke.client.post("/v1/tasks", body).status != 202:
        raise Failed(f"a task for reloaded {pid} was not accepted")
    smoke.follow(body["task_id"])
    if (status := smoke.result(body["task_id"]).get("status")) != "succeeded":
        raise Failed(f"a task on reloaded {pid} ended {status}")
    return (
        f"drained {pid} to Stopped in {drained_ms:.0f} ms (a pinned task got 503 "
        f"{refused.code}); reloaded to Ready in {reload_ms:.0f} ms; a task ran on it after"
        + (f"; {busy} task(s) of others were running on it (given 60 s)" if busy else "")
    )


def determinism_smoke(smoke: Smoke) -> str:
    smoke_harness.need(smoke, "POST /v1/tasks", "GET /v1/tasks/{task_id}/events")
    run, verdict, streams = cli_determinism.run_suite(
        smoke.client,
        seeds=determinism.seeds(smoke.determinism_seeds),
        max_tokens=16,
        run_id=f"{smoke.run_id}-det",
    )
    bundle = cli_determinism.write_bundle(smoke.out / "determinism", run, verdict, streams)
    for lane in run.lanes:
        if lane.engine_version:
            smoke.seen_engines[lane.pool_id] = lane.engine_version
    said = cli_determinism.summary(verdict)
    if not verdict.passed:
        raise Failed(f"{said} (report: {bundle}/determinism.md)")
    return f"{smoke.determinism_seeds} seeds × {len(run.lanes)} pool(s), twice: {said}"


def policy_and_budgets(smoke: Smoke) -> str:
    raise NotRun(
        "the daemon offers no policy hook, and session budgets are orch.yaml settings with no "
        "API to toggle them: toggle `sessions:` in orch.yaml by hand and record it"
    )


CHECKS: tuple[tuple[str, Callable[[Smoke], str]], ...] = (
    ("a task streams (queued, started, tokens, end)", streams),
    ("placement across mixed VRAM without pins", placement),
    ("a cancel stops tokens", cancel),
    ("a full queue answers 429", backpressure),
    ("catalog verify", catalog_verify),
    ("artifact upload", artifact),
    ("drain and reload", drain_reload),
    ("determinism smoke", determinism_smoke),
    ("policy hook and session budgets toggled", policy_and_budgets),
)
