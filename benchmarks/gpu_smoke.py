"""The GPU smoke (`scripts/gpu-smoke.sh TARBALL`): the whole product on real NVIDIA GPUs,
offline, in under 8 minutes on 16 cores.

    unpack the pruned llama.cpp source tarball → build llama-server through the provisioner
    (path: source, CUDA for the GPUs NVML reports) → write a ~1 GiB and a tiny random-weight
    GGUF → serve two pools with the nvml observer → per pool: a task streams, a cancel stops
    it mid-stream, the same seed twice gives the same text → each replica's estimated VRAM
    against what NVML measured → a JSON report

Nothing is downloaded. Pools run with `--ignore-eos`, so random weights never end a task
early. Exit 0 when every check passed, 1 when one failed, 2 for bad arguments, 3 when this
machine has no NVIDIA GPU (`nvidia-smi` missing) or lacks `gguf`.

    python -m benchmarks.gpu_smoke TARBALL [--work DIR] [--report FILE] [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ENV = 0, 1, 2, 3
TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
VRAM_TOLERANCE_PCT = 10.0  # an estimate further off than this is flagged in the report


class Refused(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu-smoke", description=(__doc__ or "").split("\n")[0])
    p.add_argument("tarball", type=Path, help="the pruned llama.cpp source (.tar.xz)")
    p.add_argument("--work", type=Path, default=Path("gpu-smoke-run"), help="work folder")
    p.add_argument("--report", type=Path, help="the JSON report (default: WORK/report.json)")
    p.add_argument("--jobs", type=int, help="compile jobs (default: all cores)")
    p.add_argument("--model-gib", type=float, default=1.0, help="size of the big model")
    p.add_argument("--smoke-s", type=float, default=60.0, help="time limit of each pool's smoke")
    args = p.parse_args(argv)
    args.report = args.report or args.work / "report.json"
    return args


def check_args(args: argparse.Namespace) -> None:
    """Refused (exit 2) for arguments that cannot work, before anything is started."""
    tarball: Path = args.tarball
    if not tarball.is_file():
        raise Refused(EXIT_USAGE, f"{tarball}: no such file (give the llama.cpp source tarball)")
    if not tarball.name.endswith(TARBALL_SUFFIXES):
        raise Refused(EXIT_USAGE, f"{tarball}: not a tarball ({', '.join(TARBALL_SUFFIXES)})")
    if args.jobs is not None and args.jobs < 1:
        raise Refused(EXIT_USAGE, "--jobs must be 1 or more")
    if not 0.01 <= args.model_gib <= 64:
        raise Refused(EXIT_USAGE, "--model-gib must be between 0.01 and 64")


def check_machine() -> None:
    """Refused (exit 3) on a machine that cannot run the smoke at all."""
    if shutil.which("nvidia-smi") is None:
        raise Refused(
            EXIT_ENV,
            "nvidia-smi not found: the GPU smoke needs a machine with NVIDIA GPUs and their "
            "driver (on a machine without one, try `orchctl up --simulate`)",
        )
    try:
        import gguf  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as exc:
        raise Refused(
            EXIT_ENV, f"{exc.name} is not installed: run `make .venv/.installed`"
        ) from exc


def unpack(tarball: Path, dest: Path) -> Path:
    """The tarball's llama.cpp tree (the folder with CMakeLists.txt and ggml/), unpacked once."""
    marker = dest / ".unpacked-from"
    stamp = f"{tarball.resolve()} {tarball.stat().st_size} {tarball.stat().st_mtime_ns}"
    if not (marker.is_file() and marker.read_text() == stamp):
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(dest, filter="data")
        marker.write_text(stamp)
    for candidate in (dest, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if (candidate / "CMakeLists.txt").is_file() and (candidate / "ggml").is_dir():
            return candidate
    raise Refused(EXIT_USAGE, f"{tarball} holds no llama.cpp tree (CMakeLists.txt and ggml/)")


def vram_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Each replica's estimated and measured VRAM, and how far apart they are."""
    rows = []
    for pool in status.get("pools", []):
        for r in pool.get("replicas", []):
            est, got = r.get("vram_estimated_mib"), r.get("vram_measured_mib")
            off = round(100 * (est - got) / got, 1) if est and got else None
            rows.append(
                {
                    "pool": pool["id"],
                    "replica": r["id"],
                    "gpu": r.get("gpu"),
                    "estimated_mib": est,
                    "measured_mib": got,
                    "error_pct": off,
                    "within_tolerance": off is not None and abs(off) <= VRAM_TOLERANCE_PCT,
                }
            )
    return rows


@dataclass
class Report:
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    phases_s: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    smoke: list[dict[str, Any]] = field(default_factory=list)
    vram: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        checks = [c for pool in self.smoke for c in pool["checks"]]
        return self.error is None and bool(checks) and all(c["ok"] for c in checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "started_at": self.started_at,
            "elapsed_s": round(sum(self.phases_s.values()), 1),
            "phases_s": self.phases_s,
            "machine": self.machine,
            "build": self.build,
            "models": self.models,
            "smoke": self.smoke,
            "vram": self.vram,
            "vram_tolerance_pct": VRAM_TOLERANCE_PCT,
            "error": self.error,
        }

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class Phase:
    """Times a phase into the report and says it started."""

    def __init__(self, report: Report, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> None:
        print(f"==> {self.name}", flush=True)
        self.began = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        self.report.phases_s[self.name] = round(time.monotonic() - self.began, 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report()
    try:
        check_args(args)
        check_machine()
        from benchmarks import gpu_smoke_run  # the GPU half: imports the product

        asyncio.run(gpu_smoke_run.run(args, report, Phase))
    except Refused as exc:
        print(f"gpu-smoke: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        print(f"gpu-smoke: {report.error}", file=sys.stderr)
    report.write(args.report)
    print(f"report: {args.report} ({'ok' if report.ok else 'FAILED'})")
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
