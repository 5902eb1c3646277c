"""Serving what `orchctl up` prepared: the daemon in the foreground, its pools watched until
Ready, the smoke test, the report, then serving until Ctrl-C.

`cli_up.cmd_up` fills a `Plan` (what it found or made: config, engine, model) and calls
`serve(args, plan)`, which returns the exit code. Pool states are printed as they change; a
pool that fails, or stays Unschedulable past UNSCHEDULABLE_GRACE_S, ends `up` with exit 1
before the smoke. The terminal shows warnings only and the daemon's whole log goes to
<state>/up.log. Ctrl-C (or SIGTERM, SIGHUP) stops the daemon, which stops its engines: exit 130.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import daemon, early_signals, logs, smoking
from reconciler.cli_common import EXIT_FAILED, EXIT_OK

UNSCHEDULABLE_GRACE_S = 10.0


@dataclass
class Plan:
    """What `up` found or made, for the report."""

    config: Path
    wrote_config: bool = False
    engine: str = "the sim engine (simulated GPUs)"
    model: str = ""
    model_id: str = "starter"
    source: str | None = None  # the llama.cpp source asked for (None: the default)
    notes: list[str] = field(default_factory=list)


def step(text: str) -> None:
    """One step of `up` on the terminal (`==> …`)."""
    print(f"==> {text}", flush=True)


async def serve(args: argparse.Namespace, plan: Plan) -> int:
    handler = _quiet_logs()
    try:
        d = daemon.build(daemon.Options(config_path=plan.config))
    except BaseException:
        _close(handler)
        raise
    handler = _log_file(handler, d.state_dir / "up.log")
    loop = asyncio.get_running_loop()
    interrupted = threading.Event()

    def on_signal(name: str) -> None:
        interrupted.set()
        d.stop(name)

    for sig in early_signals.STOPS:
        loop.add_signal_handler(sig, on_signal, sig.name)
    for name in early_signals.take():  # sent while orchctl was still loading
        on_signal(name)
    job = loop.create_task(d.run())
    step(f"serving {plan.config}")
    try:
        problem = await until_ready(d, job)
        if job.done() or interrupted.is_set():
            return 130 if interrupted.is_set() else EXIT_FAILED
        if problem is not None:
            print(f"    {problem}")
            return EXIT_FAILED
        step(f"smoke test ({args.smoke_s:.0f} s at most)")
        smoke = smoking.Smoke(
            d.spool,
            d.results,
            plan.model_id,
            max_cancel_tokens=smoking.cancel_tokens(d.config.state, plan.model_id),
            budget_s=args.smoke_s,
        )
        run = loop.create_task(smoke.run())
        await asyncio.wait([run, job], return_when=asyncio.FIRST_COMPLETED)
        if not run.done():
            run.cancel()
            return 130
        outcomes = run.result()
        print(report(plan, d, outcomes, staying=not args.stop_after_smoke))
        if not all(o.ok for o in outcomes):
            return EXIT_FAILED
        if args.stop_after_smoke:
            return EXIT_OK
        print("serving until Ctrl-C", flush=True)
        await job
        return EXIT_OK
    finally:
        if not job.done():
            d.stop("orchctl up ending")
        await asyncio.wait_for(job, 60)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        step("stopped: engines stopped, nothing left running")
        _close(handler)


async def until_ready(d: daemon.Daemon, job: asyncio.Task[int]) -> str | None:
    """Wait until every pool is Ready, printing what changes; the problem when one cannot be."""
    shown: dict[str, tuple[str, str | None, float]] = {}
    stuck_since: dict[str, float] = {}
    state = d.config.state
    limit = (state.timeouts.ready_s if state else 120.0) + 60.0
    last_change = time.monotonic()
    while not job.done():
        pools = d.status().pools
        now = time.monotonic()
        for p in pools:
            before = shown.get(p.id)
            moved = before is None or before[:2] != (p.state, p.reason)
            if moved and (before is None or before[0] != p.state or now - before[2] >= 2.0):
                print(
                    f"    pool {p.id}: {p.state}" + (f" ({p.reason})" if p.reason else ""),
                    flush=True,
                )
                shown[p.id] = (p.state, p.reason, now)
                last_change = now
            if p.state == "Failed":
                return f"pool {p.id} failed: {p.reason}"
            if p.state == "Unschedulable":
                if now - stuck_since.setdefault(p.id, now) > UNSCHEDULABLE_GRACE_S:
                    return f"pool {p.id} cannot be placed: {p.reason}"
            else:
                stuck_since.pop(p.id, None)
        if pools and all(p.state in ("Ready", "Stopped") and not p.reason for p in pools):
            return None
        if now - last_change > limit:
            return f"the pools did not become Ready within {limit:.0f} s"
        await asyncio.sleep(0.2)
    return None


def report(
    plan: Plan, d: daemon.Daemon, outcomes: list[smoking.Outcome], *, staying: bool = True
) -> str:
    """The summary `up` prints; `staying`: the daemon goes on serving (else it stops now,
    and the next step is to serve)."""
    passed = sum(o.ok for o in outcomes)
    status = d.status()
    pools = ", ".join(
        f"{p.id} {p.state}"
        + (f" on GPU {','.join(map(str, p.replicas[0].gpu))}" if p.replicas else "")
        for p in status.pools
    )
    lines = [
        "",
        "llama-orch is up" if passed == len(outcomes) else "llama-orch is up, but the smoke failed",
        f"  config   {plan.config}" + (" (written now)" if plan.wrote_config else ""),
        f"  engine   {plan.engine}",
        *([f"  model    {plan.model}"] if plan.model else []),
        f"  pools    {pools}",
        f"  API      {status.daemon.url}",
        f"  smoke    {passed} of {len(outcomes)} checks passed",
        *(f"    {'ok  ' if o.ok else 'FAIL'}  {o.name}: {o.detail}" for o in outcomes),
        *(f"  note     {n}" for n in plan.notes),
        "",
        f"next, from another terminal: orchctl submit {_task_file(plan)} "
        f"--config {plan.config} --wait"
        if staying
        else f"next: orchctl serve --config {plan.config} (this run stops now), then "
        f"orchctl submit {_task_file(plan)} --config {plan.config} --wait",
    ]
    return "\n".join(lines)


def _task_file(plan: Plan) -> str:
    hello = plan.config.parent / "hello.task.yaml"
    return str(hello) if hello.is_file() else "TASK.task.yaml"


def _quiet_logs() -> logging.Handler | None:
    """Warnings on the terminal; the daemon's whole log goes to <state>/up.log."""
    logs.setup(fmt="pretty", level="info", stream=sys.stderr)
    for h in logging.getLogger(logs.ROOT).handlers:
        h.setLevel(logging.WARNING)
    return None


def _log_file(handler: logging.Handler | None, path: Path) -> logging.Handler | None:
    try:
        with_file = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return handler
    with_file.setFormatter(logs.JsonLinesFormatter())
    logging.getLogger(logs.ROOT).addHandler(with_file)
    return with_file


def _close(handler: logging.Handler | None) -> None:
    if handler is not None:
        logging.getLogger(logs.ROOT).removeHandler(handler)
        handler.close()
