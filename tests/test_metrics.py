"""`GET /metrics` through a real socket: the exposition parses, every required series is
declared before its first sample, counters move as tasks run, get canceled and get rejected,
the latency histograms have the home buckets, and each daemon counts in its own registry."""

from __future__ import annotations

import math
from typing import Any

import aiohttp
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler import metrics
from tests.conftest import Workspace, config, task, wait_for, wait_terminal

pytestmark = pytest.mark.slow

REQUIRED = {
    "tasks_enqueued_total": "counter",
    "tasks_started_total": "counter",
    "tasks_canceled_total": "counter",
    "tasks_rejected_total": "counter",
    "tokens_in_total": "counter",
    "tokens_out_total": "counter",
    "admission_backpressure_events_total": "counter",
    "replica_restarts_total": "counter",
    "queue_depth": "gauge",
    "vram_used_bytes": "gauge",
    "gpu_utilization": "gauge",
    "pool_ready": "gauge",
    "latency_first_token_ms": "histogram",
    "latency_decode_ms": "histogram",
    "placement_decisions_total": "counter",
    "placement_candidates_considered": "gauge",
    "drain_events_total": "counter",
}


class Scrape:
    """One parsed exposition: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def _reach(ws: Workspace, task_id: str, status: str) -> None:
    def there() -> bool:
        result = ws.result(task_id)
        return result is not None and result["status"] == status

    await wait_for(there, 10, f"{task_id} {status}")


async def _scrape(running: Any, **headers: str) -> Scrape:
    server = running.daemon.server
    assert server is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.url}/metrics", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert response.headers["X-Correlation-Id"]
        return Scrape(await response.text())


async def test_a_fresh_daemon_declares_every_required_series_before_any_sample(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    scrape = await _scrape(running)
    for name, kind in REQUIRED.items():
        assert f"# TYPE {name} {kind}\n" in scrape.text, name
    assert scrape.value("tasks_enqueued_total") == 0
    assert "_created" not in scrape.text  # not part of the contract
    # the gauges come from the live status: both simulated GPUs, the pool, both priorities
    assert {s["device"] for s in scrape.labelsets("vram_used_bytes")} == {"0", "1"}
    assert scrape.value("vram_total_bytes", device="0") == 24576 * 1024 * 1024
    assert scrape.value("pool_ready", pool_id="p1") == 1
    assert {s["priority"] for s in scrape.labelsets("queue_depth")} == {"interactive", "batch"}
    assert scrape.labelsets("replica_restarts_total") == [{"pool_id": "p1", "replica_id": "p1-0"}]


async def test_counters_and_histograms_move_as_tasks_run(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    workspace.submit("a.task.yaml", task("a", max_tokens=6, priority="interactive"))
    workspace.submit("b.task.yaml", task("b", max_tokens=4, pool="p1", model=None))
    for task_id in ("a", "b"):
        assert (await wait_terminal(workspace, task_id))["status"] == "succeeded"
    scrape = await _scrape(running)
    sim = {"engine": "sim", "pool_id": "p1"}
    assert scrape.value("tasks_enqueued_total", engine="sim") == 2
    assert scrape.value("tasks_enqueued_total", priority="interactive") == 1
    assert scrape.value("tasks_enqueued_total", pool_id="p1", priority="batch") == 1
    assert scrape.value("tasks_started_total", **sim, replica_id="p1-0") == 2
    assert scrape.value("tokens_out_total", **sim) == 10
    assert scrape.value("tokens_in_total", **sim) >= 2
    for name, buckets in (
        ("latency_first_token_ms", metrics.FIRST_TOKEN_BUCKETS_MS),
        ("latency_decode_ms", metrics.DECODE_BUCKETS_MS),
    ):
        assert scrape.value(f"{name}_count", **sim) == 2
        assert scrape.value(f"{name}_count", priority="interactive") == 1
        les = [s["le"] for s in scrape.labelsets(f"{name}_bucket") if s["priority"] == "batch"]
        assert [float(le) for le in les] == [*map(float, buckets), math.inf]
    assert scrape.value("tasks_canceled_total") == scrape.value("tasks_rejected_total") == 0


async def test_cancels_rejections_and_backpressure_are_counted_by_reason(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config(queue={"capacity": 1, "full_policy": "reject"})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    workspace.submit("run.task.yaml", task("run", max_tokens=400))
    await _reach(workspace, "run", "running")
    workspace.submit("wait.task.yaml", task("wait", max_tokens=4, pool="p1"))
    await _reach(workspace, "wait", "queued")
    workspace.submit("full.task.yaml", task("full"))
    workspace.submit("nope.task.yaml", task("nope", model="no-such-model"))
    for task_id in ("full", "nope"):
        assert (await wait_terminal(workspace, task_id))["status"] == "rejected"
    mid = await _scrape(running)
    assert mid.value("queue_depth", priority="batch") == 1
    assert mid.value("active_leases", pool_id="p1") == 1
    for task_id in ("wait", "run"):  # one canceled while queued, one while running
        workspace.spool.cancel.joinpath(task_id).write_text("")
        running.daemon.wake()
        assert (await wait_terminal(workspace, task_id))["status"] == "canceled"
    scrape = await _scrape(running)
    assert scrape.value("tasks_rejected_total", engine="sim", reason="ADMISSION_REJECT") == 1
    assert scrape.value("tasks_rejected_total", reason="MODEL_UNKNOWN") == 1
    assert scrape.value("admission_backpressure_events_total", policy="reject") == 1
    assert scrape.value("tasks_canceled_total", reason="queued") == 1
    # counted under the pool it was enqueued for, so cancels per pool can be read
    assert scrape.value("tasks_canceled_total", reason="queued", pool_id="p1") == 1
    assert scrape.value("tasks_enqueued_total", pool_id="p1") == 1
    assert scrape.value("tasks_canceled_total", reason="running", replica_id="p1-0") == 1
    assert scrape.value("tasks_started_total") == 1
    assigned = scrape.value("placement_decisions_total", outcome="assigned", pinned="false")
    assert assigned == 1 and scrape.value("placement_candidates_considered") == 1
    assert scrape.value("tasks_enqueued_total") == 2  # the rejected ones never were
    assert scrape.value("latency_decode_ms_count") == 0  # only a success has a decode time


async def test_a_drop_lru_eviction_counts_as_a_rejection_and_as_backpressure(
    workspace: Workspace, serve: Any
) -> None:
    cfg = config(queue={"capacity": 1, "full_policy": "drop-lru"})
    cfg["pools"][0].update(slots=1, sim={"tokens_per_s": 20, "load_s": 0.0})
    workspace.write_config(cfg)
    running = await serve()
    workspace.submit("run.task.yaml", task("run", max_tokens=400))
    await _reach(workspace, "run", "running")
    workspace.submit("old.task.yaml", task("old", max_tokens=4))
    await _reach(workspace, "old", "queued")
    workspace.submit("new.task.yaml", task("new", max_tokens=4))
    evicted = await wait_terminal(workspace, "old")
    assert evicted["error"]["code"] == "QUEUE_FULL_DROP_LRU"
    scrape = await _scrape(running)
    assert scrape.value("tasks_rejected_total", reason="QUEUE_FULL_DROP_LRU") == 1
    assert scrape.value("admission_backpressure_events_total", policy="drop-lru") == 1


async def test_metrics_need_the_token_like_every_route(
    workspace: Workspace, serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "feedfacefeedface5678"
    monkeypatch.setenv("TEST_ORCH_TOKEN", token)
    workspace.write_config(
        config(auth={"token_env": "TEST_ORCH_TOKEN", "optional_on_loopback": False})
    )
    running = await serve()
    url = f"{running.daemon.server.url}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 401 and (await response.json())["code"] == "MISSING_TOKEN"
    scrape = await _scrape(running, Authorization=f"Bearer {token}")
    assert "# TYPE tasks_enqueued_total counter" in scrape.text


async def test_openmetrics_is_served_to_a_scraper_that_asks_for_it(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    url = f"{running.daemon.server.url}/metrics"
    for accept in (  # media types are case-insensitive (RFC 9110)
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "APPLICATION/OPENMETRICS-TEXT",
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Accept": accept}) as response,
        ):
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await response.text()).endswith("# EOF\n")


async def test_a_format_refused_with_q_0_is_not_served(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    url = f"{running.daemon.server.url}/metrics"
    for accept in (
        "application/openmetrics-text;q=0, text/plain",
        "text/plain;q=0.5, application/openmetrics-text; version=1.0.0; Q=0.000",
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, headers={"Accept": accept}) as response,
        ):
            assert response.headers["Content-Type"].startswith("text/plain"), accept
            assert not (await response.text()).endswith("# EOF\n")


async def test_each_daemon_counts_in_its_own_registry(workspace: Workspace, serve: Any) -> None:
    running = await serve()
    workspace.submit("x.task.yaml", task("x", max_tokens=2))
    await wait_terminal(workspace, "x")
    assert (await _scrape(running)).value("tasks_started_total") == 1
    global_text = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "tasks_started_total" not in global_text


async def test_a_model_the_openai_routes_refuse_is_counted_as_a_task_of_it_would_be(
    workspace: Workspace, serve: Any
) -> None:
    """POST /v1/tasks for a model orch.yaml does not serve is a rejected task, counted by
    reason; the same request on /v1/chat/completions is refused before it becomes a task,
    and is counted alike, so a dashboard sees the refusals agents and SDKs meet too."""
    running = await serve()
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{running.daemon.server.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 404, await r.text()
    scrape = await _scrape(running)
    assert scrape.value("tasks_rejected_total", reason="MODEL_UNKNOWN") == 1


async def test_a_pool_drained_on_request_counts_one_drain_event(
    workspace: Workspace, serve: Any
) -> None:
    running = await serve()
    url = f"{running.daemon.server.url}/v1/pools/p1/drain"
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the same drain asked again is the same drain
            async with session.post(url, json={}) as response:
                assert response.status in (200, 202), await response.text()
    scrape = await _scrape(running)
    assert scrape.value("drain_events_total", pool_id="p1", reason="api_request") == 1
