"""`orchctl smoke [--url URL] [--out DIR]`: the home reference smoke (HME-040) against a
running daemon, over its HTTP API.

It walks the checklist of `smoke_checks.CHECKS` (a task streams, placement across mixed VRAM
without pins, cancel, a 429 under backpressure, catalog verify, an artifact upload, drain and
reload, a determinism smoke) and writes two files into `--out`: `environment.md` (the GPUs
from the daemon's status, driver and CUDA, OS, kernel, CPU and memory; what is unknown says
so) and `smoke_report.md` (each check passed, failed with why, or not run with why), plus the
determinism smoke's own bundle in `determinism/`. Exit 0 when no check failed, 1 when one did,
3 when no daemon answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from reconciler import about, api_auth, cli_common, cli_determinism, smoke_checks, smoke_harness
from reconciler.cli_common import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Refused


def add_verb(verb: Any, config: Any) -> None:
    s = verb("smoke", cmd_smoke, "walk the home reference smoke checklist against the daemon")
    s.add_argument(
        "--out",
        type=cli_common.path_arg,
        help="the report folder (default: proof/home-smoke/RUN beside orch.yaml)",
    )
    s.add_argument(
        "--determinism-seeds",
        type=cli_common.positive,
        default=4,
        help="seeds of the determinism smoke",
    )
    cli_determinism.add_connection(s, config)


def cmd_smoke(args: argparse.Namespace) -> int:
    if args.determinism_seeds < 1:
        raise Refused(EXIT_USAGE, "--determinism-seeds must be 1 or more")
    run_id = time.strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or Path(args.config).parent / "proof" / "home-smoke" / run_id
    cli_common.report_folder(out, keep=False)  # before the checks run: their results kept
    client = cli_determinism.client_for(args)
    out.mkdir(parents=True, exist_ok=True)
    smoke = smoke_harness.Smoke(
        client=client, run_id=run_id, out=out, determinism_seeds=args.determinism_seeds
    )
    smoke.offered = client.offered()
    smoke.refresh()
    caps = client.get("/v1/capabilities")
    smoke.capabilities = caps.json if caps.status == 200 and isinstance(caps.json, dict) else {}
    found = []
    for name, check in smoke_checks.CHECKS:
        outcome = smoke_harness.run(smoke, check, name)
        print(f"{_LABEL[outcome.state]}  {name}: {outcome.detail}", flush=True)
        found.append(outcome)
    (out / "environment.md").write_text(environment(smoke), "utf-8")
    (out / "smoke_report.md").write_text(report(smoke, found), "utf-8")
    failed = [c for c in found if c.state == "failed"]
    print(f"report: {out}")
    return EXIT_FAILED if failed else EXIT_OK


_LABEL = {"passed": "ok     ", "failed": "FAILED ", "not run": "not run"}


def report(smoke: smoke_harness.Smoke, found: list[smoke_harness.Check]) -> str:
    counts = {state: sum(c.state == state for c in found) for state in _LABEL}
    verdict = "FAIL" if counts["failed"] else "PASS"
    lines = [
        "# Reference smoke (HME-040)",
        "",
        f"- run `{smoke.run_id}` against {smoke.client.base_url}",
        f"- verdict: **{verdict}**: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['not run']} not run",
        "- environment: [environment.md](environment.md); determinism smoke: "
        + (
            "[determinism/determinism.md](determinism/determinism.md)"
            if _bundle_of_this_run(smoke)
            else "no report from this run (the check did not get that far)"
        ),
        "",
        "| check | result | took | what was seen |",
        "|---|---|---|---|",
    ]
    for c in found:
        detail = c.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c.name} | {c.state} | {c.took_s:.1f} s | {detail} |")
    return "\n".join(lines) + "\n"


def _bundle_of_this_run(smoke: smoke_harness.Smoke) -> bool:
    """Whether the determinism bundle in --out is this run's (a re-run into the same folder
    must not link the earlier run's report)."""
    try:
        data = json.loads((smoke.out / "determinism" / "determinism.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("run_id") == f"{smoke.run_id}-det"


# -- environment.md ---------------------------------------------------------------------------


def environment(smoke: smoke_harness.Smoke) -> str:
    status = smoke.status
    daemon = status.get("daemon", {})
    gpus = status.get("gpus", [])
    simulated = bool(daemon.get("simulated")) or any(g.get("simulated") for g in gpus)
    local = api_auth.is_loopback_host(smoke.client.host)
    driver, cuda = _driver(simulated=simulated, local=local)
    lines = [
        "# Environment",
        "",
        f"- captured {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by orchctl {about.version()}",
        f"- daemon: {smoke.client.base_url}, version {daemon.get('version', 'unknown')}, "
        f"pid {daemon.get('pid', 'unknown')}, started {daemon.get('started_at', 'unknown')}"
        + (", simulated GPUs" if simulated else ""),
        "",
        "## GPUs (the daemon's /v1/status)",
        "",
        "| index | name | VRAM total | VRAM free | uuid |",
        "|---|---|---|---|---|",
    ]
    for g in gpus:
        name = g["name"]
        if g.get("simulated") and "SIMULATED" not in name.upper():
            name += " (simulated)"
        lines.append(
            f"| {g['index']} | {name} | {g['vram_total_mib']} MiB | {g['vram_free_mib']} MiB | "
            f"{g['uuid']} |"
        )
    if not gpus:
        lines.append("| unknown: the daemon reports no GPU | | | | |")
    lines += [
        "",
        f"- NVIDIA driver: {driver}",
        f"- CUDA (the driver's): {cuda}",
        "",
        "## Engines (the pools, and the engine versions the smoke's tasks reported)",
        "",
    ]
    for p in status.get("pools", []):
        version = smoke.seen_engines.get(p["id"], "unknown: no task of the smoke ran on it")
        lines.append(
            f"- {p['id']}: engine {p['engine']} {version}, model {p['model']}, {p['state']}"
        )
    where = (
        "this machine, which is the daemon's"
        if local
        else ("the machine orchctl ran on, NOT the daemon's (the URL is not loopback)")
    )
    lines += [
        "",
        f"## Host ({where})",
        "",
        f"- OS: {_os_release()}",
        f"- kernel: {platform.system()} {platform.release()} {platform.machine()}",
        f"- CPU: {_cpu()}, {os.cpu_count() or 'unknown'} logical cores",
        f"- memory: {_mem_total()}",
        f"- disk free where the report is written: {_disk_free(smoke.out)}",
    ]
    return "\n".join(lines) + "\n"


def _driver(*, simulated: bool, local: bool) -> tuple[str, str]:
    if simulated:
        return "none: the daemon runs simulated GPUs", "none: simulated GPUs"
    if not local:
        unknown = "unknown: the daemon does not report it, and it runs on another machine"
        return unknown, unknown
    from plugins import gpu_nvml, interfaces
    from reconciler import toolchain_checks

    try:
        facts = gpu_nvml.read_facts()
    except interfaces.EnvironmentMissing as exc:
        unknown = f"unknown: the daemon does not report it and NVML here says: {exc.what}"
        return unknown, unknown
    driver = f"{facts.driver} (NVML on this machine)" if facts.driver else "unknown (NVML)"
    cuda = (
        f"{toolchain_checks.dotted(facts.cuda)} (NVML on this machine)"
        if facts.cuda
        else "unknown (NVML)"
    )
    return driver, cuda


def _os_release() -> str:
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        return "unknown: no /etc/os-release"
    return info.get("PRETTY_NAME") or info.get("NAME") or "unknown"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _disk_free(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 1024**3:.0f} GiB"
    except OSError:
        return "unknown"
