"""`python -m benchmarks [--quick] [--only NAME ...] [--out DIR] [--strict]` (`make bench`).

Runs the benchmarks in order, prints one table (benchmark, metric, value, target, pass,
unit) and writes every number, with the environment it ran in, to <out>/bench.json and the
table as markdown to <out>/bench.md; the daemon's JSON log of each benchmark goes to
<out>/logs/<name>.jsonl. When <out>/bench.json already holds an earlier run's results, the
table gains its value and the change for every metric both runs have, and that file is kept
as <out>/bench-previous.json (one that cannot be read is reported, kept and not compared).
Exit status: 0, or 1 when a benchmark could not finish (or, with --strict, missed a target).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    busy_disk,
    calibration,
    chat_relay,
    converge,
    harness,
    intake,
    latency,
    relay,
    report,
)

Runner = Callable[..., Coroutine[Any, Any, None]]
BENCHES: dict[str, Runner] = {
    converge.NAME: converge.run,
    intake.NAME: intake.run,
    latency.NAME: latency.run,
    calibration.NAME: calibration.run,
    relay.NAME: relay.run,
    chat_relay.NAME: chat_relay.run,
    busy_disk.NAME: busy_disk.run,
}


def environment() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    versions: dict[str, str | None] = {}
    for pkg in ("pydantic", "PyYAML", "watchdog", "aiohttp"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit: str | None = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "packages": versions,
        "git_commit": commit,
        "gpus": "simulated 24 GB + 12 GB pair (sim engine child processes)",
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="llama-orch home benchmarks (simulated GPUs)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tasks")
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHES),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHES)}",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a metric misses its target"
    )
    return parser.parse_args(argv)


def run_one(name: str, *, quick: bool, out: Path) -> report.BenchResult:
    bench = report.BenchResult(name)
    began = time.perf_counter()
    print(f"running {name}{' (quick)' if quick else ''} ...", file=sys.stderr, flush=True)
    harness.stops.clear()
    bench.details["load_avg_before"] = list(os.getloadavg())
    with harness.LogCapture(out / "logs" / f"{name}.jsonl") as captured:
        try:
            asyncio.run(BENCHES[name](bench, quick=quick))
        except Exception as exc:  # report and carry on with the next benchmark
            bench.error = f"{type(exc).__name__}: {exc}"
            bench.details["traceback"] = traceback.format_exc()
    bench.wall_s = time.perf_counter() - began
    bench.details["daemon_log_warnings"] = dict(captured.counts)
    bench.details["daemon_stops"] = list(harness.stops)
    unclean = [s for s in harness.stops if s["exit"] != 0 or s["leftover_engines"]]
    if unclean and bench.error is None:
        bench.error = f"a daemon did not stop cleanly: {unclean[0]}"
    print(f"  {name}: {bench.wall_s:.1f} s", file=sys.stderr, flush=True)
    return bench


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    names = [n for n in BENCHES if not args.only or n in args.only]
    env = environment()
    began = time.perf_counter()
    with harness.removals_deferred():
        done = [run_one(name, quick=args.quick, out=args.out) for name in names]
    total_s = time.perf_counter() - began
    results_path = args.out / "bench.json"
    previous, problem = report.read_previous(results_path)
    note = report.comparison_note(previous, problem)
    gone = report.dropped(done, previous)
    print(report.table(done, previous))
    print(f"\n{note}")
    for bench, metric in gone:
        print(f"not reported this time: {bench}: {metric}")
    if results_path.exists():  # kept whole, even unreadable: it is someone's earlier run
        os.replace(results_path, args.out / "bench-previous.json")
    report.write_json(
        results_path,
        {
            "environment": env,
            "options": {"quick": args.quick, "only": names},
            "total_s": round(total_s, 3),
            "compared_with": _compared_with(previous, problem),
            "table": [m.as_dict() for b in done for m in b.metrics],
            "benchmarks": {b.name: b.as_dict() for b in done},
        },
    )
    caption = [
        f"run {env['date']} at commit {env['git_commit'] or 'unknown'}"
        f"{', --quick' if args.quick else ''}: {', '.join(names)} in {total_s:.1f} s",
        f"{env['cpus_usable'] or env['cpu_count']} usable CPUs, load average at start "
        f"{_load(env['load_avg_at_start'])}; simulated GPUs",
        note,
        "every number, with its environment and details: bench.json; daemon logs: logs/",
    ]
    report.write_text(args.out / "bench.md", report.markdown(done, previous, caption=caption))
    print(
        f"{len(done)} benchmark(s) in {total_s:.1f} s; numbers in {results_path}, "
        f"table in {args.out / 'bench.md'}"
    )
    failed = any(b.error for b in done)
    missed = any(m.passed is False for b in done for m in b.metrics)
    return 1 if failed or (args.strict and missed) else 0


def _compared_with(previous: report.Previous | None, problem: str | None) -> dict[str, Any]:
    if previous is None:
        return {"file": None, "problem": problem}
    return {
        "file": "bench-previous.json",
        "commit": previous.commit,
        "date": previous.date,
        "quick": previous.quick,
    }


def _load(avg: list[float] | None) -> str:
    return "unknown" if avg is None else " ".join(f"{v:.2f}" for v in avg)


if __name__ == "__main__":
    raise SystemExit(main())
