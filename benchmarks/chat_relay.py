"""`chat-relay`: a streamed chat through the daemon's OpenAI route, against the same sim
engine's own chat endpoint, measured in the same run.

The daemon runs one Ready sim pool (1 slot, `TOKENS_PER_S`, ctx 8192). Each round sends the
same streamed chat (`max_tokens` N, a fixed seed) twice, one after the other so they never
share the slot: once straight to the replica's `/v1/chat/completions` (its port read from
the daemon's engine record), once to the daemon's `/v1/chat/completions`, which turns it into
a task, runs it on that replica and relays the frames as OpenAI chunks.

How it is timed (`time.perf_counter()` in the client, which shares the daemon's event loop):
each `data:` line holding a content delta is one token; the stream rate is (tokens − 1) ÷
(last token − first token), the rate the tokens reach the client once they flow. The ratio
is the daemon's rate ÷ the engine's own, median over the rounds (target ≥ 0.95: the relay
adds no bottleneck). Each round's first-token times are reported beside it (admission,
queueing and placement add to the daemon's), and so is the end-to-end rate (tokens ÷ time
from request to last token), which includes them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import aiohttp

from benchmarks import harness, report
from benchmarks.harness import BenchError, StatusWatch

NAME = "chat-relay"
TOKENS_PER_S = 1000.0
TOKENS = 2000
QUICK_TOKENS = 600
ROUNDS = 5
QUICK_ROUNDS = 2
TIMEOUT_S = 60.0
CONTENT = b'"delta":{"content":"'


def _config() -> dict[str, Any]:
    return harness.base_config(
        models={"m1": {"ref": "file:models/m1.gguf", "size_mib": 1000}},
        pools=[
            harness.sim_pool(
                "p1", "m1", ctx=8192, slots=1, tokens_per_s=TOKENS_PER_S, first_token_ms=5.0
            )
        ],
    )


async def _stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, float]:
    """Send one streamed chat; its token count, first-token time and rates."""
    sent = time.perf_counter()
    stamps: list[float] = []
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise BenchError(
                f"POST {url}: HTTP {response.status}: {(await response.read())[:200]!r}"
            )
        async for line in response.content:
            if (
                line.startswith(b"data: ")
                and CONTENT in line
                and not line.startswith(b'data: {"error"')
            ):
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise BenchError(f"POST {url}: {len(stamps)} tokens")
    return {
        "tokens": len(stamps),
        "first_token_ms": (stamps[0] - sent) * 1000,
        "stream_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
        "end_to_end_tokens_per_s": len(stamps) / (stamps[-1] - sent),
    }


async def run(bench: report.BenchResult, *, quick: bool) -> None:
    tokens, rounds = (QUICK_TOKENS, QUICK_ROUNDS) if quick else (TOKENS, ROUNDS)
    body = {
        "model": "m1",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "max_tokens": tokens,
        "seed": 7,
        "stream": True,
    }
    direct: list[dict[str, float]] = []
    relayed: list[dict[str, float]] = []
    with harness.workspace(_config()) as ws:
        async with harness.serving(ws) as srv:
            watch = StatusWatch(ws)
            await srv.wait_for(
                lambda: harness.all_ready(watch.read()), timeout_s=30, what="pool p1 Ready"
            )
            server = srv.daemon.server
            if server is None:
                raise BenchError("the daemon serves no HTTP")
            engine_url = srv.ws.engine_url() + "/v1/chat/completions"
            daemon_url = server.url + "/v1/chat/completions"
            timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await _stream(session, daemon_url, body | {"max_tokens": 20})  # warm-up
                for _ in range(rounds):
                    srv.check_alive()
                    direct.append(await _stream(session, engine_url, body))
                    relayed.append(await _stream(session, daemon_url, body))
    for got in (*direct, *relayed):
        if got["tokens"] != tokens:
            raise BenchError(f"a stream gave {got['tokens']} tokens, not {tokens}")
    engine_rate = statistics.median(d["stream_tokens_per_s"] for d in direct)
    relay_rate = statistics.median(r["stream_tokens_per_s"] for r in relayed)
    ratios = [
        r["stream_tokens_per_s"] / d["stream_tokens_per_s"]
        for d, r in zip(direct, relayed, strict=True)
    ]
    bench.add(
        "relay ÷ engine stream rate (1 client)",
        statistics.median(ratios),
        "×",
        report.Target(">=", 0.95),
        note=f"{tokens} tokens at {TOKENS_PER_S:g} tokens/s, median of {rounds}",
    )
    bench.add("engine's own chat stream", engine_rate, "tokens/s")
    bench.add("through the daemon", relay_rate, "tokens/s")
    bench.add(
        "first token: engine / daemon (p50)",
        statistics.median(d["first_token_ms"] for d in direct),
        "ms",
        note=f"daemon {statistics.median(r['first_token_ms'] for r in relayed):.1f} ms",
    )
    bench.add(
        "end to end: daemon ÷ engine",
        statistics.median(r["end_to_end_tokens_per_s"] for r in relayed)
        / statistics.median(d["end_to_end_tokens_per_s"] for d in direct),
        "×",
        note="request to last token, admission included",
    )
    bench.details.update(
        {
            "tokens": tokens,
            "rounds": rounds,
            "engine_tokens_per_s_configured": TOKENS_PER_S,
            "method": "streamed chat, same seed, direct to the replica then through the daemon",
            "direct": direct,
            "relayed": relayed,
            "ratios": ratios,
        }
    )
