"""The client side of the `relay` benchmark, run as its own process so the clients' parsing
does not share the daemon's CPU time: `python -m benchmarks.relay_clients MODE ...`.

- `direct URL N`: stream N tokens straight from an engine's /completion.
- `sse URL TASK CLIENTS`: open CLIENTS SSE streams of TASK at once and read them to the end.
- `idle URL TASK,TASK,... SECONDS`: hold one SSE stream per task open, reading, for SECONDS.

Prints one JSON object: per stream, the tokens seen and the wall-clock times of the first and
last token (the rate is taken between them, so connection set-up is not counted).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def _direct(url: str, n: int) -> dict[str, Any]:
    body = {"prompt": "bench", "n_predict": n, "stream": True, "seed": 1}
    times: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/completion", json=body) as response,
    ):
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            frame = json.loads(line[5:])
            if frame.get("content"):
                times.append(time.monotonic())
            if frame.get("stop"):
                break
    return {"streams": [_stream(times)]}


async def _one_sse(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Read one stream to its end, counting token events chunk by chunk (parsing every line
    of fifty fast streams in one Python process would measure the client, not the daemon).
    The times are those of the chunks that brought the first and the last token."""
    count, first, last = 0, 0.0, 0.0
    tail = b""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=None)) as response:
        async for chunk in response.content.iter_any():
            data = tail + chunk
            found = data.count(b"event: token\n") - tail.count(b"event: token\n")
            if found:
                now = time.monotonic()
                first = first or now
                last = now
                count += found
            if b"event: end\n" in data or b"event: error\n" in data:
                break
            tail = data[-16:]
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return {"tokens": count, "tokens_per_s": rate}


async def _sse(url: str, task: str, clients: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = await asyncio.gather(
            *(_one_sse(session, f"{url}/v1/tasks/{task}/events") for _ in range(clients))
        )
    return {"streams": list(streams)}


async def _idle(url: str, tasks: list[str], seconds: float) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=0)
    open_streams = 0
    async with aiohttp.ClientSession(connector=connector) as session:

        async def hold(task: str) -> None:
            nonlocal open_streams
            timeout = aiohttp.ClientTimeout(total=None)
            async with session.get(f"{url}/v1/tasks/{task}/events", timeout=timeout) as r:
                open_streams += 1
                async for _ in r.content:
                    pass

        holders = [asyncio.ensure_future(hold(t)) for t in tasks]
        await asyncio.sleep(seconds)
        held = open_streams
        for h in holders:
            h.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
    return {"held": held}


def _stream(times: list[float]) -> dict[str, Any]:
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"tokens": len(times), "tokens_per_s": rate}


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "direct":
        out = asyncio.run(_direct(argv[1], int(argv[2])))
    elif mode == "sse":
        out = asyncio.run(_sse(argv[1], argv[2], int(argv[3])))
    else:
        out = asyncio.run(_idle(argv[1], argv[2].split(","), float(argv[3])))
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
