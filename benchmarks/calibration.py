"""`calibration`: are the admission-time estimates any good on a bursty mixed workload?

Two sim pools with few slots: `fast` (model ma, 2 slots, 150 tokens/s, first token 20 ms)
and `slow` (model mb, 1 slot, 60 tokens/s, first token 30 ms). 60 tasks (seeded, so every run
sends the same workload) arrive in 5 bursts of 12, 1.2 s apart: two thirds on ma, max_tokens
from 4 to 64, 30 % interactive, 70 % with a deadline of 0.3-4 s.

For each task accepted into the queue, the estimates it was given are read from its
`queued` frame (the result file's copy is overwritten when the task starts):
- predicted_start_ms against the actual wait, `timings.queue_ms` of the result (monotonic,
  from acceptance to start);
- on_time_probability against whether it met its deadline: `succeeded` is on time (the
  daemon fails a task that runs past its deadline with DEADLINE_UNMET), `DEADLINE_UNMET` is
  late; anything else is not scored.
Tasks rejected at admission (e.g. a deadline predicted unmeetable) have no `queued` frame and
are counted apart. Scored with `reconciler.estimates.Calibration`: mean absolute error and
Brier score (0 is perfect; a constant guess of the observed on-time rate r scores r(1 − r),
reported as the reference).

The start target (≤ 20 %) puts the MAE beside the mean actual wait over the same samples
(tasks with both a predicted start and an actual wait): an error of 150 ms is poor on waits of
200 ms and fine on waits of 3 s, so the ratio MAE ÷ mean wait is what is judged.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import time
from typing import Any

from benchmarks import harness, report
from benchmarks.harness import BenchError, StatusWatch
from reconciler import estimates
from state import spool

NAME = "calibration"
SEED = 20240601
BURSTS, PER_BURST, GAP_S = 5, 12, 1.2
QUICK_BURSTS = 3
TIMEOUT_S = 120.0


def _config() -> dict[str, Any]:
    return harness.base_config(
        models={
            "ma": {"ref": "file:models/ma.gguf", "size_mib": 2000},
            "mb": {"ref": "file:models/mb.gguf", "size_mib": 4000},
        },
        pools=[
            harness.sim_pool("fast", "ma", ctx=2048, slots=2, tokens_per_s=150, first_token_ms=20),
            harness.sim_pool("slow", "mb", ctx=2048, slots=1, tokens_per_s=60, first_token_ms=30),
        ],
        queue_capacity=256,
    )


def workload(bursts: int) -> list[list[dict[str, Any]]]:
    rng = random.Random(SEED)
    out = []
    for b in range(bursts):
        burst = []
        for i in range(PER_BURST):
            task: dict[str, Any] = {
                "task_id": f"c{b}-{i:02d}",
                "model": "ma" if rng.random() < 2 / 3 else "mb",
                "prompt": "summarize the river report",
                "max_tokens": rng.choice([4, 8, 16, 24, 32, 48, 64]),
                "priority": "interactive" if rng.random() < 0.3 else "batch",
            }
            if rng.random() < 0.7:
                task["deadline_ms"] = rng.randint(300, 4000)
            burst.append(task)
        out.append(burst)
    return out


async def run(bench: report.BenchResult, *, quick: bool) -> None:
    plan = workload(QUICK_BURSTS if quick else BURSTS)
    tasks = [t for burst in plan for t in burst]
    with harness.workspace(_config()) as ws:
        async with harness.serving(ws) as srv:
            watch = StatusWatch(ws)
            await srv.wait_for(
                lambda: harness.all_ready(watch.read(), 2), timeout_s=30, what="both pools Ready"
            )
            began = time.monotonic()
            for b, burst in enumerate(plan):
                await asyncio.sleep(max(0.0, began + b * GAP_S - time.monotonic()))
                for task in burst:
                    spool.deliver(
                        ws.spool, json.dumps(task).encode(), name=f"{task['task_id']}.task.json"
                    )
            await srv.wait_for(
                lambda: all(ws.terminal(t["task_id"]) for t in tasks),
                timeout_s=TIMEOUT_S,
                what="every task terminal",
                poll_s=0.05,
            )
            rows = [_row(ws, t) for t in tasks]
    _score(bench, rows)


def _row(ws: harness.Workspace, task: dict[str, Any]) -> dict[str, Any]:
    task_id = task["task_id"]
    result = ws.terminal(task_id)
    if result is None:
        raise BenchError(f"task {task_id} has no terminal result")
    queued = next((f for f in ws.frames(task_id) if f.event == "queued"), None)
    code = (result.get("error") or {}).get("code")
    on_time: bool | None = None
    if "deadline_ms" in task:
        if result["status"] == "succeeded":
            on_time = True
        elif code == "DEADLINE_UNMET":
            on_time = False
    return {
        "task_id": task_id,
        "model": task["model"],
        "max_tokens": task["max_tokens"],
        "priority": task["priority"],
        "deadline_ms": task.get("deadline_ms"),
        "status": result["status"],
        "code": code,
        "queued": queued is not None,
        "predicted_start_ms": queued.data.get("predicted_start_ms") if queued else None,
        "on_time_probability": queued.data.get("on_time_probability") if queued else None,
        "actual_start_ms": result["timings"].get("queue_ms"),
        "on_time": on_time,
    }


def _score(bench: report.BenchResult, rows: list[dict[str, Any]]) -> None:
    accepted = [r for r in rows if r["queued"]]
    predictions = [
        estimates.Prediction(
            predicted_start_ms=r["predicted_start_ms"]
            if r["actual_start_ms"] is not None
            else None,
            actual_start_ms=float(r["actual_start_ms"] or 0),
            on_time_probability=r["on_time_probability"],
            on_time=r["on_time"],
        )
        for r in accepted
    ]
    cal = estimates.Calibration.of(predictions)
    started = [
        r
        for r in accepted
        if r["actual_start_ms"] is not None and r["predicted_start_ms"] is not None
    ]
    bias = (
        sum(r["predicted_start_ms"] - r["actual_start_ms"] for r in started) / len(started)
        if started
        else None
    )
    mean_wait = sum(r["actual_start_ms"] for r in started) / len(started) if started else None
    ratio = (
        cal.start_mae_ms / mean_wait
        if cal.start_mae_ms is not None and mean_wait  # None or 0: no ratio
        else None
    )
    scored = [
        r for r in accepted if r["on_time"] is not None and r["on_time_probability"] is not None
    ]
    rate = sum(1 for r in scored if r["on_time"]) / len(scored) if scored else None
    bench.add("predicted start: MAE", cal.start_mae_ms, "ms", note=f"n={cal.start_samples}")
    bench.add("predicted start: mean bias", bias, "ms", note="predicted − actual")
    bench.add("actual wait: mean", mean_wait, "ms", note=f"n={len(started)}, same as the MAE")
    bench.add(
        "predicted start: MAE ÷ mean actual wait",
        ratio,
        "",
        report.Target("<=", 0.20),
        note="under the mixed bursty load",
    )
    bench.add("on-time probability: Brier", cal.brier, "", note=f"n={cal.brier_samples}")
    bench.add(
        "Brier of constant guess",
        None if rate is None else rate * (1 - rate),
        "",
        note="reference",
    )
    statuses = collections.Counter(f"{r['status']}:{r['code'] or '-'}" for r in rows)
    bench.details.update(
        {
            "tasks": len(rows),
            "accepted": len(accepted),
            "rejected_at_admission": len(rows) - len(accepted),
            "start_samples": cal.start_samples,
            "start_mae_ms": cal.start_mae_ms,
            "start_bias_ms": bias,
            "mean_actual_wait_ms": mean_wait,
            "start_mae_over_mean_wait": ratio,
            "brier_samples": cal.brier_samples,
            "brier": cal.brier,
            "on_time_rate": rate,
            "outcomes": dict(statuses),
            "rows": rows,
        }
    )
