"""What every benchmark shares: a temporary workspace on the simulated workstation, a daemon
run in-process on the current event loop, polling helpers and percentiles.

The workspace mirrors the test harness (tests/conftest.py) without importing pytest: an
inventory of a simulated 24 GB + 12 GB pair, orch.yaml written by atomic replace, and the
results/ and .orch/status.json the daemon writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reconciler import daemon as daemons
from reconciler import logs
from state import events, results, spool

INVENTORY: dict[str, Any] = {
    "gpus": [
        {
            "index": 0,
            "name": "NVIDIA GeForce RTX 3090",
            "uuid": "GPU-bench-0",
            "vram_total_mib": 24576,
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 3060",
            "uuid": "GPU-bench-1",
            "vram_total_mib": 12288,
        },
    ]
}

STOP_TIMEOUT_S = 30.0
CAPTURED_LIBRARIES = ("watchdog",)


class BenchError(Exception):
    """A benchmark could not produce its numbers (timeout, daemon died, wrong outcome)."""


def base_config(
    *,
    models: dict[str, dict[str, Any]],
    pools: list[dict[str, Any]],
    queue_capacity: int = 64,
) -> dict[str, Any]:
    """A desired state on the simulated pair; `models` and `pools` as in orch.yaml."""
    return {
        "version": 1,
        "server": {"bind": "127.0.0.1:0"},
        "gpus": {"observer": "simulated", "inventory": "inventory.yaml", "reserve_mib": 512},
        "queue": {"capacity": queue_capacity, "full_policy": "reject"},
        "timeouts": {"ready_s": 30, "drain_s": 5, "stop_grace_s": 2},
        "models": models,
        "pools": pools,
    }


def sim_pool(
    pool_id: str,
    model: str,
    *,
    ctx: int = 256,
    slots: int = 1,
    tokens_per_s: float = 400.0,
    first_token_ms: float = 5.0,
    load_s: float = 0.0,
    replicas: int = 1,
) -> dict[str, Any]:
    return {
        "id": pool_id,
        "engine": "sim",
        "model": model,
        "replicas": replicas,
        "ctx": ctx,
        "slots": slots,
        "sim": {"tokens_per_s": tokens_per_s, "load_s": load_s, "first_token_ms": first_token_ms},
    }


@dataclass
class Workspace:
    root: Path

    @classmethod
    def create(cls, root: Path, config: dict[str, Any]) -> Workspace:
        ws = cls(root)
        (root / "inventory.yaml").write_text(yaml.safe_dump(INVENTORY))
        ws.write_config(config)
        return ws

    @property
    def config_path(self) -> Path:
        return self.root / "orch.yaml"

    @property
    def spool(self) -> spool.Spool:
        return spool.Spool(self.root / "spool").ensure()

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def status_path(self) -> Path:
        return self.root / ".orch" / "status.json"

    @property
    def engine_records(self) -> Path:
        return self.root / ".orch" / "engines"

    def write_config(self, data: dict[str, Any]) -> None:
        """Atomic replace, as an editor or `orchctl apply` would."""
        self.stage_config(data)
        self.commit_config()

    def stage_config(self, data: dict[str, Any]) -> None:
        """Write the new orch.yaml beside the real one; `commit_config` renames it in."""
        (self.root / ".orch.yaml.tmp").write_text(yaml.safe_dump(data, sort_keys=False))

    def commit_config(self) -> None:
        (self.root / ".orch.yaml.tmp").replace(self.config_path)

    def result(self, task_id: str) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads((self.results_dir / f"{task_id}.json").read_bytes())
            return loaded
        except (OSError, ValueError):
            return None

    def terminal(self, task_id: str) -> dict[str, Any] | None:
        r = self.result(task_id)
        return r if r is not None and r.get("status") in results.TERMINAL else None

    def frames(self, task_id: str) -> list[events.EventFrame]:
        return list(events.read(self.results_dir / f"{task_id}.events.jsonl"))

    def status(self) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(self.status_path.read_bytes())
            return loaded
        except (OSError, ValueError):
            return None

    def engine_url(self) -> str:
        """The base URL of the one engine replica this workspace's daemon recorded."""
        records = list(self.engine_records.glob("*.json"))
        if len(records) != 1:
            raise BenchError(f"expected one engine record, found {len(records)}")
        return f"http://127.0.0.1:{int(json.loads(records[0].read_text())['port'])}"

    def recorded_engine_pids(self) -> list[int]:
        pids = []
        for path in self.engine_records.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                pids.append(int(json.loads(path.read_text())["pid"]))
        return pids


class StatusWatch:
    """Reads status.json, parsing it only when its bytes changed (polling stays cheap)."""

    def __init__(self, ws: Workspace) -> None:
        self.path = ws.status_path
        self._raw: bytes | None = None
        self._data: dict[str, Any] | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_bytes()
        except OSError:
            return self._data
        if raw != self._raw:
            try:
                self._data = json.loads(raw)
                self._raw = raw
            except ValueError:
                pass
        return self._data


@dataclass
class Served:
    """A daemon running as a task of the current event loop."""

    ws: Workspace
    daemon: daemons.Daemon
    job: asyncio.Task[int]

    def check_alive(self) -> None:
        if self.job.done():
            exc = None if self.job.cancelled() else self.job.exception()
            raise BenchError(f"the daemon stopped early: {exc!r}" if exc else "daemon exited")

    async def wait_for(
        self,
        check: Callable[[], Any],
        *,
        timeout_s: float,
        what: str,
        poll_s: float = 0.005,
    ) -> Any:
        """Poll `check` every `poll_s` until it returns something truthy; BenchError on timeout
        or when the daemon dies meanwhile."""
        end = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            value = check()
            if value:
                return value
            if time.monotonic() >= end:
                raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}")
            await asyncio.sleep(poll_s)


def all_ready(status: dict[str, Any] | None, count: int | None = None) -> bool:
    """status.json shows its pools (exactly `count` of them, when given) Ready, no reason."""
    return bool(
        status
        and status["pools"]
        and (count is None or len(status["pools"]) == count)
        and all(p["state"] == "Ready" and not p.get("reason") for p in status["pools"])
    )


@contextlib.asynccontextmanager
async def serving(ws: Workspace, *, resync_s: float = daemons.RESYNC_S) -> AsyncIterator[Served]:
    """Run a daemon on `ws` for the duration of the block, then stop it and its engines."""
    options = daemons.Options(config_path=ws.config_path, resync_s=resync_s)
    daemon = daemons.build(options)
    job = asyncio.get_running_loop().create_task(daemon.run(), name="bench-daemon")
    served = Served(ws, daemon, job)
    outcome: dict[str, Any] = {"exit": None, "stop_s": None, "leftover_engines": 0}
    try:
        yield served
    finally:
        asked = time.perf_counter()
        daemon.stop()
        try:
            outcome["exit"] = await asyncio.wait_for(asyncio.shield(job), STOP_TIMEOUT_S)
        except TimeoutError:
            outcome["exit"] = "timeout"
            job.cancel()
            with contextlib.suppress(BaseException):
                await job
        except Exception as exc:  # the daemon's own failure was reported by check_alive
            outcome["exit"] = repr(exc)
        outcome["stop_s"] = round(time.perf_counter() - asked, 3)
        outcome["leftover_engines"] = _kill_leftovers(ws)
        stops.append(outcome)


stops: list[dict[str, Any]] = []
"""How each daemon of the current benchmark stopped: exit code (0), seconds, and how many
recorded engines were still alive afterwards (0: the daemon stopped all of them)."""


def _kill_leftovers(ws: Workspace) -> int:
    """Engines the daemon recorded and did not stop: never leave a sim child behind."""
    killed = 0
    for pid in ws.recorded_engine_pids():
        try:  # only a sim child of this workspace: a recorded pid may have been reused
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"plugins.sim_server" not in cmdline or str(ws.root).encode() not in cmdline:
                continue
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            pass
    return killed


# Workspaces whose removal waits for the end of the whole run (`removals_deferred`). On ext4
# without a journal (this kind of VM's root filesystem), an inode freed in the last minute or
# more is skipped, one by one, by every later file creation in its block group: removing one
# benchmark's 10,000 files made each file the next benchmark created cost 100-400 us more.
# A benchmark measures its own daemon, not the cleanup of the one before it.
_deferred: list[Path] | None = None


@contextlib.contextmanager
def removals_deferred() -> Iterator[None]:
    """Workspaces made inside the block are removed at its end, all together, not each
    when its benchmark ends."""
    global _deferred
    _deferred = []
    try:
        yield
    finally:
        roots, _deferred = _deferred, None
        for root in roots:
            _rmtree(root)


@contextlib.contextmanager
def workspace(config: dict[str, Any], *, keep: bool = False) -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    try:
        yield Workspace.create(root, config)
    finally:
        if keep:
            pass
        elif _deferred is not None:
            _deferred.append(root)
        else:
            _rmtree(root)


def _rmtree(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@dataclass
class LogCapture:
    """The daemon's JSON log of one benchmark, written to a file; counts warnings and errors."""

    path: Path
    counts: dict[str, int] = field(default_factory=dict)
    handler: logging.Handler | None = None

    def __enter__(self) -> LogCapture:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        root = logging.getLogger(logs.ROOT)
        root.handlers.clear()
        root.setLevel(logging.INFO)
        root.propagate = False
        handler = logging.FileHandler(self.path, mode="w", encoding="utf-8")
        handler.setFormatter(logs.JsonLinesFormatter())
        counter = _Counter(self.counts)
        counter.setLevel(logging.WARNING)
        root.addHandler(handler)
        root.addHandler(counter)
        # watchdog logs an ERROR when its inotify thread is stopped mid-read (daemon stop):
        # keep it in the benchmark's log, out of the table on stdout.
        for name in CAPTURED_LIBRARIES:
            lib = logging.getLogger(name)
            lib.propagate = False
            lib.addHandler(handler)
            lib.addHandler(counter)
        self.handler = handler
        return self

    def __exit__(self, *exc: object) -> None:
        for name in (logs.ROOT, *CAPTURED_LIBRARIES):
            logger = logging.getLogger(name)
            for h in list(logger.handlers):
                logger.removeHandler(h)
                h.close()


class _Counter(logging.Handler):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        event = str(getattr(record, "orch_event", record.name))
        key = f"{record.levelname.lower()}:{event}"
        self.counts[key] = self.counts.get(key, 0) + 1


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": sum(values) / len(values),
    }
