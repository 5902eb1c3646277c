"""`busy_disk`: the daemon's durable writes while something else writes a lot to the same disk.

A user's workstation is rarely idle: a model download, a copy of a 20 GB GGUF or a build
writes to the filesystem the daemon's results live on, and the kernel keeps hundreds of
megabytes of it in the page cache before writing it back. A group commit that synced the whole
filesystem (`syncfs`) waits for all of that other data, at every task transition, and holds
the event loop meanwhile; the daemon syncs only its own files while much else is dirty
(state/atomic.py).

1. One group commit of COMMIT_FILES result-sized files, timed: on an idle disk; with DIRTY_MIB
   of another file's data written (not synced) just before, as the daemon commits (its own
   files only, here); and the same with the whole filesystem synced, as before (which also
   writes the other file back). The ratio compares the last two, measured in one run.
2. Tasks end to end (TASKS task files dropped at once, timed until all are terminal, as
   `intake` does) on one Ready sim pool (8 slots, 2,000 tokens/s): with the disk idle, then
   while a child process writes a file on the same filesystem at WRITER_MIB_S (a fast model
   download) without syncing it, started HEAD_START_S before the tasks. Also measured in each:
   the event loop's longest stall (a 5 ms ticker on the daemon's loop: how late it woke), the
   most an SSE client or an HTTP request waits for an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.harness import BenchError, StatusWatch
from state import atomic

NAME = "busy_disk"
COMMIT_FILES = 100
DIRTY_MIB = 800
TASKS = 300
QUICK_TASKS = 100
MAX_TOKENS = 4
SLOTS = 8
WRITER_MIB_S = 200
WRITER_FILE_MIB = 1024
HEAD_START_S = 2.0  # the download's data waiting to be written back when the tasks come
TICK_S = 0.005
TIMEOUT_S = 120.0

_WRITER = """
import os, sys, time
path, size, rate = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3]) << 20
chunk = b"\\1" * (1 << 20)
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
t0, written = time.monotonic(), 0
print("ready", flush=True)
while True:
    os.pwrite(fd, chunk, written % size)
    written += len(chunk)
    ahead = written / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
"""


def _config() -> dict[str, Any]:
    return harness.base_config(
        models={"m1": {"ref": "file:models/m1.gguf", "size_mib": 1000}},
        pools=[
            harness.sim_pool(
                "p1", "m1", ctx=512, slots=SLOTS, tokens_per_s=2000.0, first_token_ms=0.0
            )
        ],
        queue_capacity=2000,
    )


@contextlib.contextmanager
def _writer(folder: Path) -> Iterator[None]:
    """A child rewriting a file in `folder` at WRITER_MIB_S, without syncs, until the end."""
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WRITER,
            str(folder / "download.part"),
            str(WRITER_FILE_MIB),
            str(WRITER_MIB_S),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise BenchError("the writer process did not start")
        time.sleep(HEAD_START_S)
        yield
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def _whole_filesystem_syncs() -> Iterator[None]:
    """Group commits choose `syncfs` whatever is dirty, as they did before."""
    real = atomic._dirty_bytes
    atomic._dirty_bytes = lambda: 0
    try:
        yield
    finally:
        atomic._dirty_bytes = real


@contextlib.asynccontextmanager
async def _ticker() -> AsyncIterator[list[float]]:
    """The event loop's stalls while the block runs: how late each TICK_S sleep woke (s)."""
    lags: list[float] = []

    async def tick() -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(TICK_S)
            lags.append(time.monotonic() - t - TICK_S)

    job = asyncio.create_task(tick())
    try:
        yield lags
    finally:
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job


def _commit_ms(folder: Path, tag: str) -> float:
    """One group commit of COMMIT_FILES new result-sized files in `folder`, in ms."""
    data = b"x" * 600
    t0 = time.perf_counter()
    with atomic.group():
        for i in range(COMMIT_FILES):
            atomic.write_bytes(folder / f"{tag}{i}.json", data)
    return (time.perf_counter() - t0) * 1000


def _dirty(path: Path) -> None:
    """DIRTY_MIB written to `path` and left for the kernel to write back."""
    chunk = b"\1" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(DIRTY_MIB):
            f.write(chunk)


def commits(root: Path) -> tuple[float, float, float]:
    """(idle, dirty as the daemon commits, dirty with the whole filesystem synced) in ms."""
    folder = root / "commits"
    folder.mkdir()
    os.sync()
    idle = _commit_ms(folder, "i")
    _dirty(root / "other-1.bin")
    busy = _commit_ms(folder, "b")
    os.sync()
    _dirty(root / "other-2.bin")
    with _whole_filesystem_syncs():
        whole = _commit_ms(folder, "w")
    return idle, busy, whole


async def _round(srv: harness.Served, tag: str, n: int) -> tuple[float, float]:
    """(tasks/s until all n are terminal, the longest loop stall in ms)."""
    ws = srv.ws
    sp = ws.spool
    staged: list[tuple[Path, Path]] = []
    for i in range(n):
        name = f"{tag}{i:04d}.task.json"
        part = sp.tmp / f"{name}.part"
        body = {"task_id": f"{tag}{i:04d}", "model": "m1", "prompt": "hi", "max_tokens": MAX_TOKENS}
        part.write_text(json.dumps(body))
        staged.append((part, sp.incoming / name))
    async with _ticker() as lags:
        t0 = time.monotonic()
        for part, target in staged:
            os.rename(part, target)
        while True:
            srv.check_alive()
            filed = sum(1 for e in os.scandir(sp.done) if e.name.startswith(tag))
            filed += sum(1 for e in os.scandir(sp.failed) if e.name.startswith(tag))
            if filed >= n:
                break
            if time.monotonic() - t0 > TIMEOUT_S:
                raise BenchError(f"{tag}: {filed} of {n} tasks terminal after {TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
    bad = [
        f"{tag}{i:04d}"
        for i in range(n)
        if (ws.result(f"{tag}{i:04d}") or {}).get("status") != "succeeded"
    ]
    if bad:
        raise BenchError(f"{tag}: {len(bad)} tasks did not succeed, e.g. {bad[0]}")
    return n / took, max(lags, default=0.0) * 1000


async def run(bench: report.BenchResult, *, quick: bool) -> None:
    n = QUICK_TASKS if quick else TASKS
    with harness.workspace(_config()) as ws:
        idle_ms, busy_ms, whole_ms = commits(ws.root)
        async with harness.serving(ws) as srv:
            watch = StatusWatch(ws)
            await srv.wait_for(
                lambda: harness.all_ready(watch.read()), timeout_s=30, what="pool p1 Ready"
            )
            idle, idle_stall = await _round(srv, "i", n)
            with _writer(ws.root):
                busy, busy_stall = await _round(srv, "b", n)
    bench.add(f"group commit of {COMMIT_FILES} files, disk idle", idle_ms, "ms")
    bench.add(f"… with {DIRTY_MIB} MiB of other data dirty", busy_ms, "ms")
    bench.add(
        "… the same, syncing the whole filesystem",
        whole_ms,
        "ms",
        note="as group commits did before: waits for the other data too",
    )
    bench.add(
        "commit with other data dirty ÷ whole-filesystem sync",
        busy_ms / whole_ms,
        "ratio",
        report.Target("<=", 0.25),
    )
    bench.add("end to end, disk idle", idle, "tasks/s")
    bench.add(f"end to end, {WRITER_MIB_S} MiB/s written beside", busy, "tasks/s")
    bench.add("end to end: disk busy ÷ idle", busy / idle, "ratio")
    bench.add("longest loop stall, disk idle", idle_stall, "ms")
    bench.add("longest loop stall, disk busy", busy_stall, "ms")
    bench.details.update(
        {
            "tasks": n,
            "writer_mib_s": WRITER_MIB_S,
            "writer_file_mib": WRITER_FILE_MIB,
            "head_start_s": HEAD_START_S,
            "commit_files": COMMIT_FILES,
            "dirty_mib": DIRTY_MIB,
            "commit_ms": {"idle": idle_ms, "dirty": busy_ms, "dirty_whole_filesystem": whole_ms},
            "tasks_per_s": {"idle": idle, "busy": busy},
            "longest_stall_ms": {"idle": idle_stall, "busy": busy_stall},
        }
    )
