"""The GPU half of `benchmarks.gpu_smoke`: build, models, serve, smoke, VRAM, on real GPUs.

`gpu_smoke.main` calls `run` once its argument and machine checks passed; every phase fills
the `Report` as it goes, so a failure still leaves a report of what was done.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from benchmarks import gguf_models, gpu_smoke
from plugins import gpu_nvml, llamacpp_builds, provision_llamacpp
from reconciler import daemon, smoking

READY_S = 300.0
POLL_S = 0.5


async def run(
    args: argparse.Namespace, report: gpu_smoke.Report, phase: Callable[..., Any]
) -> None:
    work: Path = args.work.resolve()
    facts = gpu_nvml.read_facts()
    archs = gpu_nvml.cuda_archs(facts.gpus)
    report.machine = {
        "driver": facts.driver,
        "cuda": ".".join(map(str, facts.cuda)) if facts.cuda else None,
        "cpus": os.cpu_count(),
        "gpus": [dataclasses.asdict(g) for g in facts.gpus],
        "cuda_archs": list(archs),
    }
    with phase(report, "unpack"):
        tree = gpu_smoke.unpack(args.tarball, work / "src")
    with phase(report, "build"):
        said: list[str] = []

        def progress(line: str) -> None:
            said.append(line)
            print(f"    {line}", flush=True)

        binary = await asyncio.to_thread(
            provision_llamacpp.ensure,
            f"path:{tree}",
            archs=archs,
            jobs=args.jobs,
            cache=work / "engines",
            progress=progress,
        )
        record = llamacpp_builds.read_record(binary)
        report.build = {
            "binary": str(binary),
            "cached": not any(line.startswith("installed ") for line in said),
            "record": record.model_dump(mode="json") if record else None,
        }
    with phase(report, "models"):
        shapes = {
            "big": gguf_models.Shape.gib(args.model_gib),
            "small": gguf_models.Shape(n_embd=256, n_layer=4, n_head=8, n_head_kv=4, n_ff=512),
        }
        for name, shape in shapes.items():
            path = await asyncio.to_thread(
                gguf_models.write, work / "models" / f"{name}.gguf", shape, seed=len(name)
            )
            report.models.append(
                {
                    "name": name,
                    "path": str(path),
                    "bytes": path.stat().st_size,
                    "params": shape.params(),
                    "shape": dataclasses.asdict(shape),
                }
            )
    config = write_config(work, binary, len(facts.gpus))
    d = daemon.build(daemon.Options(config_path=config))
    job = asyncio.get_running_loop().create_task(d.run())
    try:
        with phase(report, "serve"):
            await until_ready(d, job)
        with phase(report, "smoke"):
            for pool in ("big", "small"):
                smoke = smoking.Smoke(d.spool, d.results, pool, budget_s=args.smoke_s)
                outcomes = await smoke.run()
                for o in outcomes:
                    print(f"    {'ok  ' if o.ok else 'FAIL'}  {pool}: {o.name}: {o.detail}")
                report.smoke.append(
                    {"pool": pool, "checks": [dataclasses.asdict(o) for o in outcomes]}
                )
            await asyncio.sleep(2.5)  # one more NVML poll, after the requests
            report.vram = gpu_smoke.vram_rows(d.status().model_dump(mode="json"))
            for row in report.vram:
                measured = row["measured_mib"]
                print(
                    f"    VRAM {row['replica']}: estimated {row['estimated_mib']} MiB, "
                    + (
                        f"measured {measured} MiB ({row['error_pct']:+} %)"
                        if measured
                        else "not measured (NVML listed no process)"
                    )
                )
    finally:
        d.stop("gpu smoke done")
        await asyncio.wait_for(job, 60)


def write_config(work: Path, binary: Path, gpus: int) -> Path:
    """Two pools: the big model on GPU 0, the small one on the last GPU (GPU 0 when alone)."""

    def pool(name: str, gpu: int) -> dict[str, Any]:
        # --ignore-eos: random weights would otherwise end tasks at a random token
        return {
            "id": name,
            "engine": "llamacpp",
            "model": name,
            "devices": [gpu],
            "replicas": 1,
            "ctx": 4096,
            "slots": 2,
            "flags": ["--ignore-eos"],
        }

    config = {
        "version": 1,
        "server": {"bind": "127.0.0.1:0"},
        "gpus": {"observer": "nvml", "reserve_mib": 512, "poll_s": 1.0},
        "timeouts": {"ready_s": 180},
        "models": {
            "big": {"ref": "file:models/big.gguf"},
            "small": {"ref": "file:models/small.gguf"},
        },
        "engines": {"llamacpp": {"binary": str(binary)}},
        "pools": [pool("big", 0), pool("small", gpus - 1)],
    }
    path = work / "orch.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def until_ready(d: daemon.Daemon, job: asyncio.Task[int]) -> None:
    deadline = time.monotonic() + READY_S
    shown: dict[str, tuple[str, str | None]] = {}
    while time.monotonic() < deadline and not job.done():
        pools = d.status().pools
        for p in pools:
            if shown.get(p.id) != (p.state, p.reason):
                shown[p.id] = (p.state, p.reason)
                print(f"    pool {p.id}: {p.state}" + (f" ({p.reason})" if p.reason else ""))
            if p.state in ("Failed", "Unschedulable"):
                raise RuntimeError(f"pool {p.id} is {p.state}: {p.reason}{_log_tail(d, p.id)}")
        if pools and all(p.state == "Ready" and not p.reason for p in pools):
            return
        await asyncio.sleep(POLL_S)
    if job.done():
        job.result()  # the daemon's own error
    raise RuntimeError(f"the pools were not Ready within {READY_S:.0f} s: {shown}")


def _log_tail(d: daemon.Daemon, pool_id: str) -> str:
    logs = sorted((d.state_dir / "engines").glob(f"{pool_id}-*.log"))
    if not logs:
        return ""
    tail = logs[-1].read_text(errors="replace").splitlines()[-15:]
    return "\n" + "\n".join(f"  {line}" for line in tail)
