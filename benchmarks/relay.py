"""`relay`: how much of an engine's streaming speed reaches SSE clients, and what idle
clients and a deep queue cost the daemon.

Rates, as ratios measured in the same run (machines are noisy; ratios are not):
- The engine's own rate: N tokens streamed straight from the sim replica's /completion by a
  client process (tokens after the first ÷ time from the first to the last).
- Relayed: a task of N tokens on the same replica, read over GET /v1/tasks/{id}/events by 1
  and by 50 clients at once (each its own stream, in a separate client process, connected
  while the task waits behind a blocker so every client sees it start). The ratio is each
  client's rate ÷ the engine's own; targets ≥ 0.95 for one client and, at 50 clients, no
  client below 0.90.
- Idle load: 100 SSE clients held open on queued tasks while 10,000 tasks wait in the queue
  for 60 s (`--quick`: 1,000 for 15 s); the daemon's resident memory (this process: the
  daemon runs in it, the clients do not) at the start and the end of the hold, target flat
  within 10 %.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.harness import BenchError, Served, StatusWatch
from state import spool

NAME = "relay"
TOKENS = 3000
TOKENS_PER_S = 3000.0
IDLE_CLIENTS = 100


def _config(capacity: int, tokens_per_s: float) -> dict[str, Any]:
    return harness.base_config(
        models={"m1": {"ref": "file:models/m1.gguf", "size_mib": 1000}},
        pools=[
            harness.sim_pool(
                "p1", "m1", ctx=8192, slots=1, tokens_per_s=tokens_per_s, first_token_ms=0
            )
        ],
        queue_capacity=capacity,
    )


async def _clients(*args: str, timeout_s: float = 120.0) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.relay_clients",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    if proc.returncode != 0:
        raise BenchError(f"client process failed: {err.decode()[-500:]}")
    data: dict[str, Any] = json.loads(out)
    return data


def _submit(srv: Served, task_id: str, max_tokens: int) -> None:
    body = {"task_id": task_id, "model": "m1", "prompt": "bench", "max_tokens": max_tokens}
    spool.deliver(srv.ws.spool, json.dumps(body).encode(), name=f"{task_id}.task.json")


async def _ready(srv: Served) -> str:
    watch = StatusWatch(srv.ws)
    status = await srv.wait_for(
        lambda: (
            (s := watch.read()) is not None and harness.all_ready(s) and s["daemon"]["url"] and s
        ),
        timeout_s=30,
        what="pool p1 Ready",
    )
    return str(status["daemon"]["url"])


async def _relayed(srv: Served, url: str, task_id: str, clients: int) -> list[float]:
    _submit(srv, f"{task_id}-blocker", int(TOKENS_PER_S * 1.5))  # clients connect meanwhile
    await srv.wait_for(
        lambda: (r := srv.ws.result(f"{task_id}-blocker")) is not None and r["status"] == "running",
        timeout_s=30,
        what="the blocker running",
    )
    _submit(srv, task_id, TOKENS)
    await srv.wait_for(lambda: srv.ws.result(task_id), timeout_s=30, what="the task queued")
    got = await _clients("sse", url, task_id, str(clients))
    streams = got["streams"]
    if any(s["tokens"] != TOKENS for s in streams):
        raise BenchError(f"a client missed tokens: {[s['tokens'] for s in streams]}")
    return [float(s["tokens_per_s"]) for s in streams]


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _idle(bench: report.BenchResult, *, quick: bool) -> None:
    queued, hold_s = (1000, 15.0) if quick else (10_000, 60.0)
    with harness.workspace(_config(queued + 10, tokens_per_s=5.0)) as ws:
        async with harness.serving(ws) as srv:
            url = await _ready(srv)
            _submit(srv, "hold", 8000)  # 8000 tokens at 5 tokens/s: everything else waits
            for i in range(queued):
                _submit(srv, f"q{i:05d}", 8)
            await srv.wait_for(
                lambda: (s := StatusWatch(ws).read()) is not None and s["queue"]["depth"] >= queued,
                timeout_s=600,
                what=f"{queued} tasks queued",
                poll_s=0.5,
            )
            clients = asyncio.ensure_future(
                _clients(
                    "idle",
                    url,
                    ",".join(f"q{i:05d}" for i in range(IDLE_CLIENTS)),
                    str(hold_s + 5),
                    timeout_s=hold_s + 60,
                )
            )
            await asyncio.sleep(5.0)  # the clients connect
            start = _rss_mib()
            await asyncio.sleep(hold_s)
            end = _rss_mib()
            held = (await clients)["held"]
    growth = (end - start) / start if start else 0.0
    bench.add("idle: SSE clients held", float(held), "clients", report.Target(">=", IDLE_CLIENTS))
    bench.add("idle: daemon RSS at start", start, "MiB")
    bench.add(f"idle: daemon RSS after {hold_s:.0f} s", end, "MiB")
    bench.add("idle: RSS growth", growth * 100, "%", report.Target("<=", 10.0))
    bench.details["idle"] = {"queued": queued, "hold_s": hold_s, "clients": IDLE_CLIENTS}


async def run(bench: report.BenchResult, *, quick: bool) -> None:
    with harness.workspace(_config(64, TOKENS_PER_S)) as ws:
        async with harness.serving(ws) as srv:
            url = await _ready(srv)
            direct = await _clients("direct", ws.engine_url(), str(TOKENS))
            engine_rate = float(direct["streams"][0]["tokens_per_s"])
            if engine_rate <= 0:
                raise BenchError("the engine streamed no tokens")
            one = await _relayed(srv, url, "one", 1)
            fifty = await _relayed(srv, url, "fifty", 50)
    bench.add("engine's own streaming rate", engine_rate, "tokens/s")
    bench.add("1 SSE client ÷ engine", one[0] / engine_rate, "ratio", report.Target(">=", 0.95))
    bench.add(
        "50 SSE clients: slowest ÷ engine",
        min(fifty) / engine_rate,
        "ratio",
        report.Target(">=", 0.90),
    )
    bench.add(
        "50 SSE clients: median ÷ engine", harness.percentile(fifty, 50) / engine_rate, "ratio"
    )
    bench.details["relay"] = {"tokens": TOKENS, "engine_tokens_per_s": TOKENS_PER_S}
    await _idle(bench, quick=quick)
