"""`python -m benchmarks [--quick] [--only NAME ...] [--out DIR] [--strict]` (`make bench`).

Runs the benchmarks in order, prints one table (benchmark, metric, value, target, pass,
unit) and writes every number, with the environment it ran in, to <out>/bench.json; the
daemon's JSON log of each benchmark goes to <out>/logs/<name>.jsonl. Exit status: 0, or 1
when a benchmark could not finish (or, with --strict, missed a target).
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
    done = [run_one(name, quick=args.quick, out=args.out) for name in names]
    total_s = time.perf_counter() - began
    print(report.table(done))
    print(f"\n{len(done)} benchmark(s) in {total_s:.1f} s; numbers in {args.out / 'bench.json'}")
    report.write_json(
        args.out / "bench.json",
        {
            "environment": env,
            "options": {"quick": args.quick, "only": names},
            "total_s": round(total_s, 3),
            "table": [m.as_dict() for b in done for m in b.metrics],
            "benchmarks": {b.name: b.as_dict() for b in done},
        },
    )
    failed = any(b.error for b in done)
    missed = any(m.passed is False for b in done for m in b.metrics)
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
