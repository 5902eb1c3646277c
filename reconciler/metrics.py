"""The daemon's Prometheus series (docs/http.md, `GET /metrics`): names and labels of the
digest's observability contract, in one registry per daemon.

`daemon.build` makes one `Metrics` and hands its `tap` to `tasking.Books`, which calls it
after every frame it writes: task counters and latency histograms move from the frames the
loop writes anyway, so counting adds no work to the loop beyond a dictionary lookup. Gauges
(queue depth, VRAM, GPU utilization, pool readiness, restarts) are read from
`Daemon.status()` when a scraper asks, so they are never stale and cost nothing in between.

Rules it keeps:
- One `CollectorRegistry` per daemon, never the library's global one: tests run several
  daemons in one process, and each must count only its own tasks.
- Every series is registered when the daemon is built, so a fresh daemon already lists each
  `# HELP` and `# TYPE` line before its first sample.
- A label that is not known yet (the replica of a queued task) is the empty string, which
  PromQL treats as an absent label.
- The tap never raises into the loop (Books guards it), and keeps per-task state only for
  tasks that have started and not yet ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler import admission, configuring, placement
from state import events, statusfile
from state.errors import ErrorCode

if TYPE_CHECKING:
    from reconciler import tasking

# The home buckets of the digest (§6), in milliseconds.
FIRST_TOKEN_BUCKETS_MS = (50, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000)
DECODE_BUCKETS_MS = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000)

TASK_LABELS = ("engine", "engine_version", "pool_id", "replica_id")
LATENCY_LABELS = ("engine", "engine_version", "pool_id", "priority")
BACKPRESSURE = {ErrorCode.ADMISSION_REJECT: "reject", ErrorCode.QUEUE_FULL_DROP_LRU: "drop-lru"}
# An eviction by drop-lru fails a task that was queued; the contract counts it as a rejection.
REJECTED_WHILE_QUEUED = frozenset({ErrorCode.QUEUE_FULL_DROP_LRU})

MIB = 1024 * 1024


class Metrics:
    """The series of one daemon and the tap that feeds its counters."""

    def __init__(self, *, config: configuring.AppliedConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        r = self.registry
        self.enqueued = Counter(
            "tasks_enqueued", "Tasks admitted to the queue.", [*TASK_LABELS, "priority"], registry=r
        )
        self.started = Counter(
            "tasks_started",
            "Task attempts started on a replica.",
            [*TASK_LABELS, "priority"],
            registry=r,
        )
        self.canceled = Counter(
            "tasks_canceled",
            "Tasks canceled; reason: queued or running when the cancel arrived.",
            [*TASK_LABELS, "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "tasks_rejected",
            "Tasks refused at admission (or dropped from a full queue); reason: the error code.",
            ["engine", "reason"],
            registry=r,
        )
        self.tokens_in = Counter(
            "tokens_in",
            "Prompt tokens sent to engines (the admission estimate: UTF-8 bytes / 4).",
            TASK_LABELS,
            registry=r,
        )
        self.tokens_out = Counter("tokens_out", "Tokens generated.", TASK_LABELS, registry=r)
        self.first_token = Histogram(
            "latency_first_token_ms",
            "Milliseconds from a task's start on its replica to its first token.",
            LATENCY_LABELS,
            buckets=FIRST_TOKEN_BUCKETS_MS,
            registry=r,
        )
        self.decode = Histogram(
            "latency_decode_ms",
            "Milliseconds from the first token to the end of a task that succeeded.",
            LATENCY_LABELS,
            buckets=DECODE_BUCKETS_MS,
            registry=r,
        )
        self.backpressure = Counter(
            "admission_backpressure_events",
            "Times a full queue refused (reject) or evicted (drop-lru) a task.",
            ["engine", "policy"],
            registry=r,
        )
        self.placements = Counter(
            "placement_decisions",
            "Placement decisions: assigned (a task given a slot), no_capacity (a queued task "
            "first found no free slot it may use; counted once per task); pinned: it named its "
            "pool (pin); fallback: it ran outside its preferred pools.",
            ["outcome", "pinned", "fallback"],
            registry=r,
        )
        self.considered = Gauge(
            "placement_candidates_considered",
            "Replicas the last assigned placement looked at.",
            registry=r,
        )
        self.drains = Counter(
            "drain_events",
            "Pools drained; reason: api_request (POST /v1/pools/{id}/drain).",
            ["pool_id", "reason"],
            registry=r,
        )
        self._waited: set[str] = set()  # queued tasks counted as no_capacity already
        self._tokens_counted: dict[str, int] = {}  # started tasks: token frames seen so far
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see `_child`

    def watch(self, status: Callable[[], statusfile.StatusFile]) -> None:
        """Serve the gauges from `status` (the daemon's live status) at every scrape."""
        self.registry.register(StatusCollector(status))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the scraper's Accept header asks for (Prometheus text
        by default, OpenMetrics on request), and its content type."""
        encode, content_type = exposition.choose_encoder(_accepted(accept))
        return encode(_WithoutCreated(self.registry)), content_type

    def placed(self, task_id: str, decision: placement.Decision) -> None:
        """A placement decision of the dispatcher's pump for a queued task."""
        pinned, fallback = str(decision.pinned).lower(), str(decision.fallback_used).lower()
        if decision.outcome == "assigned":
            self._waited.discard(task_id)
            self.placements.labels("assigned", pinned, fallback).inc()
            self.considered.set(decision.candidates_total)
        elif task_id not in self._waited:
            self._waited.add(task_id)
            self.placements.labels("no_capacity", pinned, fallback).inc()

    def drained(self, pool_id: str, reason: str = "api_request") -> None:
        self.drains.labels(pool_id, reason).inc()

    def refused_at_the_door(self, code: ErrorCode) -> None:
        """A request an OpenAI-compatible route refused before it became a task, for a
        reason admission refuses a task of POST /v1/tasks for (a model orch.yaml does not
        serve): counted as that task's rejection would be, so both routes count alike."""
        if code is ErrorCode.MODEL_UNKNOWN:
            self.rejected.labels("", code).inc()

    # -- the tap ----------------------------------------------------------------------------

    def tap(self, run: tasking.TaskRun, written: list[events.EventFrame]) -> None:
        """Count the frames of one kind `Books` just wrote for `run` in one write; `run.result`
        already holds the state they announce (Books updates it before writing them)."""
        event = written[0].event
        if event == "token":
            labels = self._labels(run)
            self._child(self.tokens_out, labels).inc(len(written))
            self._tokens_counted[run.task_id] = self._tokens_counted.get(run.task_id, 0) + len(
                written
            )
            first_ms = run.result.timings.first_token_ms
            if first_ms is not None and any(f.data.get("i") == 0 for f in written):
                self.first_token.labels(*self._latency_labels(run)).observe(first_ms)
        elif event == "queued":
            labels = self._queued_labels(run)
            self._child(self.enqueued, (*labels, run.priority)).inc(len(written))
        elif event == "started":
            labels = self._labels(run)
            self._child(self.started, (*labels, run.priority)).inc(len(written))
            self._child(self.tokens_in, labels).inc(admission.prompt_tokens(run.task))
            self._tokens_counted[run.task_id] = 0
        elif event in events.TERMINAL_EVENTS:
            self._waited.discard(run.task_id)
            self._ended(run)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """`metric.labels(*labels)`, kept: a task's frames count on the same few children,
        and asking the metric for one validates and locks each time."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _ended(self, run: tasking.TaskRun) -> None:
        result = run.result
        counted = self._tokens_counted.pop(run.task_id, None)
        if counted is not None and result.tokens_out > counted:
            # the engine's count is authoritative: some tokens arrive with no text of their own
            self.tokens_out.labels(*self._labels(run)).inc(result.tokens_out - counted)
        if result.status == "succeeded" and result.timings.decode_time_ms is not None:
            self.decode.labels(*self._latency_labels(run)).observe(result.timings.decode_time_ms)
        elif result.status == "canceled":
            when = "running" if counted is not None else "queued"
            # a queued one: the labels it was enqueued under (its pool, when it named one)
            labels = self._labels(run) if counted is not None else self._queued_labels(run)
            self.canceled.labels(*labels, when).inc()
        code = result.error.code if result.error is not None else None
        if code is None:
            return
        if result.status == "rejected" or code in REJECTED_WHILE_QUEUED:
            self.rejected.labels(self._engine(run), code).inc()
        if code in BACKPRESSURE:
            policy = result.error.policy_label if result.error else None
            self.backpressure.labels(self._engine(run), policy or BACKPRESSURE[code]).inc()

    def _labels(self, run: tasking.TaskRun) -> tuple[str, str, str, str]:
        result = run.result
        return (
            self._engine(run),
            result.engine_version or "",
            self._pool(run),
            result.replica_id or "",
        )

    def _queued_labels(self, run: tasking.TaskRun) -> tuple[str, str, str, str]:
        """A task's labels before it runs: no replica, and so no engine version yet."""
        return (self._engine(run), "", self._pool(run), "")

    def _latency_labels(self, run: tasking.TaskRun) -> tuple[str, str, str, str]:
        engine, version, pool, _ = self._labels(run)
        return engine, version, pool, run.priority

    def _pool(self, run: tasking.TaskRun) -> str:
        return run.result.pool_id or run.pool_id or ""

    def _engine(self, run: tasking.TaskRun) -> str:
        """The engine that runs (or would run) the task: its replica's once started, else
        its pool's, else the one engine of the pools serving its model, if they agree."""
        if run.result.engine:
            return run.result.engine
        state, pool_id = self.config.state, self._pool(run)
        if state is None:
            return ""
        if pool_id:
            spec = state.pool(pool_id)
            return spec.engine if spec is not None else ""
        engines = {p.engine for p in state.pools if p.model == run.model_id}
        return engines.pop() if len(engines) == 1 else ""


class StatusCollector(Collector):
    """Gauges read from the daemon's status at scrape time."""

    def __init__(self, status: Callable[[], statusfile.StatusFile]) -> None:
        self.status = status

    def describe(self) -> Iterable[Metric]:
        return _families()

    def collect(self) -> Iterable[Metric]:
        status = self.status()
        depth, used, total, util, ready, leases, restarts = _families()
        for priority, count in sorted(status.queue.by_priority.items()):
            depth.add_metric([priority], count)
        for gpu in status.gpus:
            device = [str(gpu.index)]
            used.add_metric(device, gpu.vram_used_mib * MIB)
            total.add_metric(device, gpu.vram_total_mib * MIB)
            if gpu.utilization_pct is not None:
                util.add_metric(device, gpu.utilization_pct)
        for pool in status.pools:
            ready.add_metric([pool.id], 1 if pool.state == "Ready" else 0)
            leases.add_metric([pool.id], sum(r.slots_busy for r in pool.replicas))
            for replica in pool.replicas:
                restarts.add_metric([pool.id, replica.id], replica.restarts)
        return [depth, used, total, util, ready, leases, restarts]


def _families() -> tuple[
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    GaugeMetricFamily,
    CounterMetricFamily,
]:
    def gauge(name: str, text: str, labels: list[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=labels)

    return (
        gauge("queue_depth", "Tasks waiting in the queue.", ["priority"]),
        gauge("vram_used_bytes", "VRAM in use on the device (as NVML reports it).", ["device"]),
        gauge("vram_total_bytes", "VRAM the device has.", ["device"]),
        gauge("gpu_utilization", "GPU utilization in percent (as NVML reports it).", ["device"]),
        gauge("pool_ready", "1 while the pool is Ready, else 0.", ["pool_id"]),
        gauge("active_leases", "Slots busy with a task, over the pool's replicas.", ["pool_id"]),
        CounterMetricFamily(
            "replica_restarts",
            "Restarts of the replica's engine after failures.",
            labels=["pool_id", "replica_id"],
        ),
    )


class _WithoutCreated(Collector):
    """The registry less the `_created` samples prometheus_client adds to every counter and
    histogram: they are not part of the contract, and double the size of every scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def _accepted(accept: str) -> str:
    """`accept` without the media ranges it refuses (`q=0`), their types in lower case:
    prometheus_client picks OpenMetrics wherever the header names it, even as
    `application/openmetrics-text;q=0`, and only as written in lower case."""
    kept = []
    for media_range in accept.split(","):
        params = [p.strip().lower().replace(" ", "") for p in media_range.split(";")[1:]]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            refused = float(q) == 0
        except ValueError:
            refused = False
        if not refused:  # media types are case-insensitive; prometheus_client matches as given
            media_type, sep, params_text = media_range.partition(";")
            kept.append(media_type.lower() + sep + params_text)
    return ",".join(kept)
