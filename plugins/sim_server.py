"""The `sim` engine's child program: a fake `llama-server` on simulated GPUs (demos, CI, bench).

`plugins.engine_sim` runs it as ``python -S -m plugins.sim_server --port P ...``; this module is
its entry point: the command line, the start-up sequence and the signals. The rest lives in
rooms of its own, all standard library only (benchmarks start dozens of these, so no aiohttp,
no pydantic, no site-packages):

- `plugins.sim_protocol`: the llama-server answers (/health, /props, /slots, /completion);
- `plugins.sim_http`: the minimal HTTP/1.1 they travel over;
- `plugins.sim_bookings`: the VRAM bookings on simulated GPUs, and the out-of-memory check;
- `plugins.sim_faults`: the injected faults (`--options-json` "faults").

Start-up: listen first (printing one line to stdout), then "load" for `load_s` seconds,
answering 503 `Loading model` meanwhile, then book the VRAM and answer 200. With
`--vram-total-mib`, loading fails with a CUDA-style out-of-memory error (exit 1) when the live
bookings leave too little room on a GPU of the mask. SIGTERM or SIGINT removes the bookings
and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from plugins import sim_bookings, sim_faults, sim_http, sim_protocol

# Defaults of state.desired.SimOptions, repeated here because the child must not import pydantic.
DEFAULT_TOKENS_PER_S = 200.0
DEFAULT_FIRST_TOKEN_MS = 5.0


@dataclass
class Config:
    host: str
    port: int
    replica_id: str
    model: str
    model_size_mib: int
    ctx: int
    slots: int
    gpus: list[int]
    state_dir: Path
    vram_total_mib: list[int] | None
    tokens_per_s: float
    load_s: float
    first_token_ms: float
    first_request_extra_ms: float = 0.0
    faults: sim_faults.Faults = field(default_factory=sim_faults.Faults)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(prog="python -m plugins.sim_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--replica-id", required=True)
    p.add_argument("--model", default="sim-model")
    p.add_argument("--model-size-mib", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True, help="context tokens per slot")
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--gpu", default="0", help="GPU index or comma-separated indices")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument(
        "--vram-total-mib",
        default=None,
        help="room for llama-orch on each GPU of the mask: N or N,M,...",
    )
    p.add_argument("--options-json", default="{}", help="SimOptions as JSON")
    a = p.parse_args(argv)
    options = json.loads(a.options_json)
    totals = [int(v) for v in a.vram_total_mib.split(",")] if a.vram_total_mib else None
    return Config(
        host=a.host,
        port=a.port,
        replica_id=a.replica_id,
        model=a.model,
        model_size_mib=a.model_size_mib,
        ctx=a.ctx,
        slots=max(1, a.slots),
        gpus=[int(g) for g in a.gpu.split(",")],
        state_dir=a.state_dir,
        vram_total_mib=totals,
        tokens_per_s=float(options.get("tokens_per_s", DEFAULT_TOKENS_PER_S)),
        load_s=float(options.get("load_s", 0.0)),
        first_token_ms=float(options.get("first_token_ms", DEFAULT_FIRST_TOKEN_MS)),
        first_request_extra_ms=float(options.get("first_request_extra_ms", 0.0)),
        faults=sim_faults.parse(options.get("faults")),
    )


def book(config: Config) -> list[Path]:
    """Book this replica's footprint on its mask (raises sim_bookings.OutOfMemory)."""
    return sim_bookings.book(
        config.state_dir,
        gpus=config.gpus,
        need_mib=sim_bookings.footprint_mib(config.model_size_mib, config.ctx, config.slots)
        + config.faults.extra_vram_mib,
        totals=config.vram_total_mib,
        replica_id=config.replica_id,
        pid=os.getpid(),
        fail=config.faults.oom_at_load,
    )


async def serve(config: Config) -> int:
    server = sim_protocol.Server(
        model=config.model,
        ctx=config.ctx,
        slots=config.slots,
        tokens_per_s=config.tokens_per_s,
        first_token_ms=config.first_token_ms,
        first_request_extra_ms=config.first_request_extra_ms,
        faults=config.faults,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    sim_faults.on_sigterm(config.faults, loop, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    listener = await asyncio.start_server(
        functools.partial(sim_http.serve_connection, route=server.route),
        config.host,
        config.port,
        reuse_address=True,
    )
    print(
        f"sim-server {sim_protocol.VERSION} replica {config.replica_id} pid {os.getpid()} "
        f"listening on http://{config.host}:{config.port}",
        flush=True,
    )
    booked: list[Path] = []
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=config.load_s)
        if stopping.is_set():
            return 0
        try:
            booked = book(config)
        except sim_bookings.OutOfMemory as oom:
            print(oom, file=sys.stderr, flush=True)
            return 1
        if not sim_faults.hang_before_ready(config.faults):
            server.ready = True
            print(
                f"model loaded in {config.load_s:g} s; ready ({config.slots} slots, ctx "
                f"{config.ctx} per slot)",
                flush=True,
            )
        await stopping.wait()
        print("sim-server: stopping on signal", flush=True)
        return 0
    finally:
        sim_bookings.unbook(booked)
        listener.close()


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    if sim_faults.crash_at_start(config.faults):
        return 1
    sim_faults.leave_child(config.faults)
    try:
        return asyncio.run(serve(config))
    except OSError as e:  # e.g. the port was taken between the engine's pick and our bind
        print(
            f"sim-server: cannot listen on {config.host}:{config.port}: {e}",
            file=sys.stderr,
            flush=True,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
