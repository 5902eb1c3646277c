"""The `sim` engine's child program: a fake `llama-server` on simulated GPUs (demos, CI, bench).

`plugins.engine_sim` runs it as ``python -m plugins.sim_server --port P ...``. It speaks the
subset of llama-server's HTTP protocol the adapters use (`/health`, `/props`, `/slots`,
`/completion`, streamed or not) with the JSON shapes of the recorded fixtures, so the one
protocol client in `plugins.llama_server` serves real and simulated replicas alike.

Benchmarks start dozens of these, so it imports the standard library only (no aiohttp, no
pydantic) and speaks a minimal HTTP/1.1 over asyncio streams.

Behaviour:
- Listens first (printing one line to stdout), then "loads" for `load_s` seconds, answering
  503 `Loading model` meanwhile, then books its VRAM and answers 200.
- Tokens are words drawn from a PRNG seeded with sha256(seed, prompt): the same seed and prompt
  give the same text, another seed other text. Each request streams at `tokens_per_s` after
  `first_token_ms`; at most `--slots` requests generate at once, the rest wait for a slot.
  A client that closes its connection stops its generation and frees its slot.
- VRAM booking (`plugins.sim_bookings`): written once loaded and removed on SIGTERM/SIGINT;
  the simulated GPU observer sums the bookings of live pids. `sim_bookings.footprint_mib` is
  the formula, shared with the engine's estimate.
- Faults (`--options-json` "faults"): crash_at_start, hang_before_ready, die_after_tokens,
  oom_at_load, ignore_sigterm. With `--vram-total-mib`, loading fails with a CUDA-style
  out-of-memory error when the live bookings leave too little room on a GPU of the mask.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugins import sim_bookings

VERSION = "0.1.0"
BUILD_INFO = f"sim-{VERSION}"

# Defaults of state.desired.SimOptions, repeated here because the child must not import pydantic.
DEFAULT_TOKENS_PER_S = 200.0
DEFAULT_FIRST_TOKEN_MS = 5.0

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her an they which or be this "
    "river stone light cloud garden window lantern harbor meadow signal engine thread pocket "
    "copper silver orange violet amber quiet rapid gentle distant hollow bright narrow open "
    "walks turns sings waits drifts builds opens folds lifts carries gathers follows answers "
    "morning evening winter summer north south island valley bridge tower market letter"
)
WORDS = tuple(_VOCABULARY.split())


def prompt_tokens(prompt: str) -> int:
    """A crude token count: one per word, plus BOS."""
    return len(prompt.split()) + 1


def tokens(seed: int, prompt: str) -> random.Random:
    """The deterministic token source of one request."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return random.Random(digest)


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
    faults: dict[str, Any] = field(default_factory=dict)


class Slots:
    """At most `n` generations at once; others wait in arrival order."""

    def __init__(self, n: int) -> None:
        self.busy = [False] * n
        self._free = asyncio.Semaphore(n)

    async def acquire(self) -> int:
        await self._free.acquire()
        slot = self.busy.index(False)
        self.busy[slot] = True
        return slot

    def release(self, slot: int) -> None:
        self.busy[slot] = False
        self._free.release()


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.status, "message": self.message, "type": self.kind}}


LOADING = HttpError(503, "Loading model", "unavailable_error")
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    411: "Length Required",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Emit = Callable[[dict[str, Any]], Awaitable[None]]


class SimServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.slots = Slots(config.slots)
        self.ready = False

    # -- HTTP ----------------------------------------------------------------------------------

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            keep_alive = True
            while keep_alive:
                request = await _read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                keep_alive = headers.get("connection", "").lower() != "close"
                try:
                    keep_alive = await self.route(method, path, body, reader, writer) and keep_alive
                except HttpError as e:
                    await _send_json(writer, e.status, e.body())
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except HttpError as e:  # a malformed request: answer and close
            with contextlib.suppress(ConnectionError):
                await _send_json(writer, e.status, e.body())
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def route(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; return False when the connection must close afterwards."""
        cfg = self.config
        if method == "GET" and path == "/health":
            if not self.ready:
                raise LOADING
            await _send_json(writer, 200, {"status": "ok"})
        elif method == "GET" and path == "/props":
            if not self.ready:
                raise LOADING
            await _send_json(
                writer,
                200,
                {
                    "default_generation_settings": {
                        "params": {
                            "seed": 4294967295,
                            "temperature": 0.8,
                            "top_k": 40,
                            "top_p": 0.95,
                            "n_predict": -1,
                        },
                        "n_ctx": cfg.ctx,
                    },
                    "total_slots": cfg.slots,
                    "model_alias": cfg.model,
                    "model_path": cfg.model,
                    "build_info": BUILD_INFO,
                    "is_sleeping": False,
                    "endpoint_slots": True,
                    "endpoint_metrics": False,
                },
            )
        elif method == "GET" and path == "/slots":
            if not self.ready:
                raise LOADING
            await _send_json(
                writer,
                200,
                [
                    {"id": i, "n_ctx": cfg.ctx, "speculative": False, "is_processing": busy}
                    for i, busy in enumerate(self.slots.busy)
                ],
            )
        elif method == "POST" and path == "/completion":
            if not self.ready:
                raise LOADING
            return await self.completion(_parse_json(body), reader, writer)
        else:
            raise HttpError(404, "File Not Found", "not_found_error")
        return True

    async def completion(
        self, body: dict[str, Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise HttpError(400, '"prompt" must be a string', "invalid_request_error")
        n_prompt = prompt_tokens(prompt)
        if n_prompt >= self.config.ctx:
            raise HttpError(
                400,
                "the request exceeds the available context size, try increasing it",
                "exceed_context_size_error",
            )
        n_predict = int(body.get("n_predict", body.get("max_tokens", -1)))
        room = self.config.ctx - n_prompt
        n = room if n_predict < 0 else min(n_predict, room)
        seed = int(body.get("seed", -1))
        if seed < 0:
            seed = random.SystemRandom().randrange(2**32)
        params = {
            "prompt": prompt,
            "n_prompt": n_prompt,
            "n": n,
            "seed": seed,
            "stream": bool(body.get("stream", False)),
            "settings": {
                "seed": seed,
                "temperature": body.get("temperature", 0.8),
                "top_k": body.get("top_k", 40),
                "top_p": body.get("top_p", 0.95),
                "n_predict": n_predict,
                "stream": bool(body.get("stream", False)),
            },
        }
        # Watch the client while generating: EOF on its side means it closed the request.
        work = asyncio.ensure_future(self.respond(params, writer))
        watch = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            work.result()
            return not (watch.done() and not watch.cancelled())  # a pipelined byte: close
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await work
        return False

    async def respond(self, params: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        slot = await self.slots.acquire()
        try:
            if params["stream"]:
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
                )

                async def emit(frame: dict[str, Any]) -> None:
                    data = b"data: " + json.dumps(frame, separators=(",", ":")).encode() + b"\n\n"
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()

                final = await self.generate(params, slot, emit)
                await emit(final)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            else:
                texts: list[str] = []

                async def collect(frame: dict[str, Any]) -> None:
                    texts.append(frame["content"])

                final = await self.generate(params, slot, collect)
                await _send_json(writer, 200, final | {"content": "".join(texts)})
        finally:
            self.slots.release(slot)

    async def generate(self, params: dict[str, Any], slot: int, emit: Emit) -> dict[str, Any]:
        """Emit one frame per token at the configured pace; return the final frame."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        rng = tokens(params["seed"], params["prompt"])
        die_after = cfg.faults.get("die_after_tokens")
        if die_after == 0:
            _die(0)
        start = loop.time()
        first = start + cfg.first_token_ms / 1000
        prompt_ms = cfg.first_token_ms
        for i in range(params["n"]):
            delay = first + i / cfg.tokens_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            token_id = rng.randrange(len(WORDS))
            await emit(
                {
                    "index": 0,
                    "content": " " + WORDS[token_id],
                    "tokens": [token_id + 3],
                    "stop": False,
                    "id_slot": -1,
                    "tokens_predicted": i + 1,
                    "tokens_evaluated": params["n_prompt"],
                }
            )
            if die_after is not None and i + 1 >= die_after:
                _die(i + 1)
        n = params["n"]
        predicted_ms = max((loop.time() - start) * 1000 - prompt_ms, 0.001)
        return {
            "index": 0,
            "content": "",
            "tokens": [],
            "id_slot": slot,
            "stop": True,
            "model": cfg.model,
            "tokens_predicted": n,
            "tokens_evaluated": params["n_prompt"],
            "generation_settings": params["settings"],
            "prompt": params["prompt"],
            "has_new_line": False,
            "truncated": False,
            "stop_type": "limit",
            "stopping_word": "",
            "tokens_cached": params["n_prompt"] + n,
            "timings": {
                "cache_n": 0,
                "prompt_n": params["n_prompt"],
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / params["n_prompt"],
                "prompt_per_second": params["n_prompt"] * 1000 / max(prompt_ms, 0.001),
                "predicted_n": n,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / n if n else 0.0,
                "predicted_per_second": n * 1000 / predicted_ms,
            },
        }


def _die(after: int) -> None:
    print(
        f"sim: fault die_after_tokens: dying abruptly after {after} tokens",
        file=sys.stderr,
        flush=True,
    )
    os._exit(134)


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if e.partial.strip():
            raise HttpError(400, "incomplete request head", "invalid_request_error") from e
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line", "invalid_request_error")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", ""):
        raise HttpError(411, "chunked request bodies are not supported", "invalid_request_error")
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return parts[0], parts[1].split("?", 1)[0], headers, body


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError as e:
        raise HttpError(400, f"invalid JSON: {e}", "invalid_request_error") from e
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object", "invalid_request_error")
    return value


async def _send_json(writer: asyncio.StreamWriter, status: int, value: Any) -> None:
    data = json.dumps(value, separators=(",", ":")).encode()
    writer.write(
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
        f"Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    await writer.drain()


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
        faults=dict(options.get("faults") or {}),
    )


def book(config: Config) -> list[Path]:
    """Book this replica's footprint on its mask (raises sim_bookings.OutOfMemory)."""
    return sim_bookings.book(
        config.state_dir,
        gpus=config.gpus,
        need_mib=sim_bookings.footprint_mib(config.model_size_mib, config.ctx, config.slots),
        totals=config.vram_total_mib,
        replica_id=config.replica_id,
        pid=os.getpid(),
        fail=bool(config.faults.get("oom_at_load")),
    )


async def serve(config: Config) -> int:
    server = SimServer(config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    if config.faults.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    listener = await asyncio.start_server(
        server.serve_connection, config.host, config.port, reuse_address=True
    )
    print(
        f"sim-server {VERSION} replica {config.replica_id} pid {os.getpid()} listening on "
        f"http://{config.host}:{config.port}",
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
        if config.faults.get("hang_before_ready"):
            print("sim: fault hang_before_ready: loaded, never becoming ready", flush=True)
        else:
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
    if config.faults.get("crash_at_start"):
        print(
            "sim: fault crash_at_start: simulated crash during start-up",
            file=sys.stderr,
            flush=True,
        )
        return 1
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
