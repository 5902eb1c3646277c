"""`intake`: 1,000 task files dropped into spool/incoming at once, end to end.

The daemon runs one Ready sim pool (8 slots, 2,000 tokens/s, first token after 0 ms; queue
capacity 2,000). The task files are first written into spool/tmp (not timed: that is the
writers' side of the maildir protocol), then renamed into incoming/ in one tight loop by a
process of their own, as a user's script would, so they land "at once". The clock starts
before the first rename.

- admitted/s: tasks ÷ time until every task has a results/<id>.json of any status (the
  daemon writes it when it queues or rejects the task).
- tasks/s: tasks ÷ time until every task is terminal. The daemon writes the terminal result
  before it moves the task file to spool/done or spool/failed, so the count of those two
  folders is what is watched; every result file is read once at the end.

Both are watched by a process of its own (`benchmarks.intake_watch`, with inotify), as a
user's watcher would be: listing folders of thousands of files in the daemon's own process
took about a tenth of its CPU time from it, and listing them every few ms from another
process a quarter of a core, while holding the folder's lock the daemon's writes wait for.

Also measured, after the run, with the daemon idle: the same 1,000 token streams asked of the
same sim replica by the daemon's own engine client (`llama_server.Client.generate` on a kept-
alive session, SLOTS at a time) and nothing else: the most tasks/s end to end could reach on
this machine with one HTTP stream per task, whatever the daemon's files cost.

Also measured: the CPU time each part spends per task from the first rename until every task
is terminal (as the watcher process sees it): the daemon's loop thread (this process's main
thread, where the daemon's event loop runs), its commit helper and trace writer processes,
and the sim engine's process (the trace writer starts at the first trace: its interpreter's
start is in its share). On a 2-core machine the loop thread is what limits end to end: this
shows where a task's time goes, whatever the disk.

Also counted: the daemon's fsync and syncfs calls per task, until all are admitted and until
all are terminal. The throughput ratios compare with the disk's rate; this shows how many
durable syncs a task costs whatever the disk (one `atomic.write_bytes` alone costs two).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import harness, report
from benchmarks.harness import BenchError, StatusWatch
from plugins import engine_pool, interfaces
from plugins.llama_server import Client
from state import atomic, committer

NAME = "intake"
TASKS = 1000
QUICK_TASKS = 250
MAX_TOKENS = 4
SLOTS = 8
TOKENS_PER_S = 2000.0
TIMEOUT_S = 180.0
DISK_WRITES = 200  # durable writes timed before and after the run, for the disk's rate


def _config() -> dict[str, Any]:
    return harness.base_config(
        models={"m1": {"ref": "file:models/m1.gguf", "size_mib": 1000}},
        pools=[
            harness.sim_pool(
                "p1", "m1", ctx=512, slots=SLOTS, tokens_per_s=TOKENS_PER_S, first_token_ms=0.0
            )
        ],
        queue_capacity=2000,
    )


class _SyncCount:
    """Counts, with their times, the fsync and syncfs calls made in this process (the daemon
    runs in it) and in the daemon's commit helper (as each commit ends) from now until
    `stop`: how many durable syncs the tasks cost."""

    def __init__(self, helper: committer.Committer | None) -> None:
        self.times: list[float] = []
        self._fsync, self._syncfs = os.fsync, atomic._syncfs
        self._helper = helper
        if helper is not None:
            helper.on_syncs = lambda n: self.times.extend([time.monotonic()] * n)

        def fsync(fd: Any) -> None:
            self.times.append(time.monotonic())
            self._fsync(fd)

        def syncfs(fd: int) -> int:
            self.times.append(time.monotonic())
            result: int = self._syncfs(fd)
            return result

        os.fsync = fsync
        if self._syncfs is not None:
            atomic._syncfs = syncfs

    def stop(self) -> None:
        os.fsync = self._fsync
        atomic._syncfs = self._syncfs
        if self._helper is not None:
            self._helper.on_syncs = None

    def until(self, when: float) -> int:
        return sum(1 for t in self.times if t <= when)


def _process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process `pid` so far (0 where it is unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuBudget:
    """CPU seconds of the daemon's parts between `__init__` and `stop`."""

    def __init__(self, srv: harness.Served) -> None:
        self._srv = srv
        self._engines = srv.ws.recorded_engine_pids()
        self._loop0 = time.thread_time()  # the daemon's loop runs in this thread
        self._at0 = self._parts()
        self.spent: dict[str, float] = {}

    def _parts(self) -> dict[str, float]:
        daemon = self._srv.daemon
        writer = daemon.tracer.writer
        return {
            "commit helper": _process_cpu_s(daemon.committer.pid if daemon.committer else None),
            "trace writer": _process_cpu_s(writer.pid if writer is not None else None),
            "engine (sim)": sum(_process_cpu_s(pid) for pid in self._engines),
        }

    def stop(self) -> None:
        self.spent = {"daemon loop thread": time.thread_time() - self._loop0}
        for part, seconds in self._parts().items():
            # a part started during the run (the trace writer, at the first trace) had 0
            self.spent[part] = seconds - self._at0[part]


def durable_writes_per_s(folder: Path, n: int = DISK_WRITES) -> float:
    """The disk's rate of durable writes as the daemon does one alone (`atomic.write_bytes`:
    a result-sized file written, fsynced, renamed into place, its folder fsynced), measured in
    `folder`, so on the same filesystem as the daemon's results."""
    folder.mkdir(parents=True)
    data = b"x" * 600  # about a queued result
    t0 = time.perf_counter()
    for i in range(n):
        atomic.write_bytes(folder / f"w{i}.json", data)
    # the files stay until the workspace goes: removed now, they would slow the creations
    # that follow (see harness.removals_deferred)
    return n / (time.perf_counter() - t0)


async def engine_alone_per_s(base_url: str, n: int) -> float:
    """Tasks/s of `n` token streams of MAX_TOKENS asked of the replica at `base_url` by the
    daemon's engine client alone, SLOTS at a time on one kept-alive session."""
    client, pool = Client(base_url), engine_pool.Pool()
    todo = list(range(n))

    async def one_slot() -> None:
        session = pool.session(client.base_url)
        while todo:
            i = todo.pop()
            request = interfaces.GenerateRequest(
                task_id=f"alone{i}", prompt="hi", max_tokens=MAX_TOKENS, seed=i
            )
            async for _ in client.generate(request, session=session):
                pass

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_slot() for _ in range(SLOTS)))
        return n / (time.perf_counter() - t0)
    finally:
        await pool.close()


async def run(bench: report.BenchResult, *, quick: bool) -> None:
    n = QUICK_TASKS if quick else TASKS
    with harness.workspace(_config()) as ws:
        disk_before = durable_writes_per_s(ws.root / "disk-probe-before")
        async with harness.serving(ws) as srv:
            watch = StatusWatch(ws)
            await srv.wait_for(
                lambda: harness.all_ready(watch.read()),
                timeout_s=30,
                what="pool p1 Ready",
                poll_s=0.01,
            )
            sp = ws.spool
            for i in range(n):
                name = f"t{i:05d}.task.json"
                body = {
                    "task_id": f"t{i:05d}",
                    "model": "m1",
                    "prompt": "hi",
                    "max_tokens": MAX_TOKENS,
                }
                (sp.tmp / f"{name}.part").write_text(json.dumps(body))
            watcher = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "benchmarks.intake_watch",
                str(n),
                str(ws.results_dir),
                str(sp.done),
                str(sp.failed),
                str(TIMEOUT_S),
                str(sp.tmp),
                str(sp.incoming),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            assert watcher.stdout is not None
            ready = await asyncio.wait_for(watcher.stdout.readline(), 30)
            if ready.strip() != b"watching":  # its watches are set before the drop
                raise BenchError(f"the watcher process did not start: {ready!r}")
            syncs = _SyncCount(srv.daemon.committer)
            cpu = _CpuBudget(srv)
            assert watcher.stdin is not None
            watcher.stdin.write(b"drop\n")  # the watcher renames them into incoming/
            await watcher.stdin.drain()
            end = time.monotonic() + TIMEOUT_S + 10
            while watcher.returncode is None:
                srv.check_alive()  # the daemon dying fails the run at once, not at the timeout
                if time.monotonic() > end:
                    watcher.kill()
                    raise BenchError("the watcher process did not finish")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wait(), 0.5)
            syncs.stop()
            cpu.stop()
            out, err = await watcher.communicate()
            if watcher.returncode != 0:
                raise BenchError(f"the watcher process failed: {err.decode()[-500:]}")
            seen = json.loads(out)
            t0, dropped_ms = seen["t0"], seen["drop_ms"]
            admitted_s, terminal_s = seen["admitted_s"], seen["terminal_s"]
            progress = seen["progress"]
            if terminal_s is None:
                raise BenchError(
                    f"timed out after {TIMEOUT_S:g} s: {progress[-1] if progress else '-'}"
                )
            statuses: collections.Counter[str] = collections.Counter()
            errors: collections.Counter[str] = collections.Counter()
            for i in range(n):
                r = ws.result(f"t{i:05d}")
                statuses[r["status"] if r else "missing"] += 1
                if r and r.get("error"):
                    errors[r["error"]["code"]] += 1
            queue_at_end = srv.daemon.dispatcher.queue_row().model_dump()
            alone = await engine_alone_per_s(ws.engine_url(), n)
        disk_after = durable_writes_per_s(ws.root / "disk-probe-after")
    assert admitted_s is not None and terminal_s is not None
    disk = (disk_before + disk_after) / 2
    bench.add("disk: durable writes/s", disk, "writes/s", note="mean of before and after")
    bench.add("tasks/s end to end", n / terminal_s, "tasks/s")
    bench.add("admitted/s (result file written)", n / admitted_s, "tasks/s")
    bench.add(
        "admitted/s ÷ disk writes/s", n / admitted_s / disk, "ratio", report.Target(">=", 1.0)
    )
    bench.add(
        "end to end ÷ disk writes/s", n / terminal_s / disk, "ratio", report.Target(">=", 0.5)
    )
    bench.add("all terminal after", terminal_s * 1000, "ms")
    bench.add(
        "engine client alone",
        alone,
        "tasks/s",
        note="the same streams with nothing else: the ceiling of end to end here",
    )
    bench.add(
        "engine client alone ÷ disk writes/s",
        alone / disk,
        "ratio",
        note="end to end ÷ disk cannot pass this",
    )
    bench.add(
        "syncs per task: until all admitted",
        syncs.until(t0 + admitted_s) / n,
        "syncs",
        note="fsync + syncfs calls of the daemon ÷ tasks",
    )
    bench.add("syncs per task: end to end", syncs.until(t0 + terminal_s) / n, "syncs")
    for who, seconds in cpu.spent.items():
        bench.add(
            f"CPU per task: {who}",
            seconds / n * 1000,
            "ms",
            note="from the first rename until the watcher saw every task terminal"
            if who == "daemon loop thread"
            else "",
        )
    bench.add("succeeded", float(statuses["succeeded"]), "tasks", report.Target(">=", float(n)))
    bench.details.update(
        {
            "tasks": n,
            "max_tokens": MAX_TOKENS,
            "slots": SLOTS,
            "tokens_per_s": TOKENS_PER_S,
            "drop_ms": round(dropped_ms, 2),
            "disk_writes_per_s": [round(disk_before, 1), round(disk_after, 1)],
            "admitted_s": round(admitted_s, 3),
            "terminal_s": round(terminal_s, 3),
            "statuses": dict(statuses),
            "error_codes": dict(errors),
            "queue_at_end": queue_at_end,
            "progress": progress[:: max(1, len(progress) // 200)],
        }
    )
