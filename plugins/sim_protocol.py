"""The sim child's llama-server answers: /health, /props, /slots, /completion and the chat
endpoint /v1/chat/completions (also /chat/completions; what it says: `plugins.sim_chat`).

`plugins.sim_server` builds one `Server` per child and serves its `route` through
`plugins.sim_http`. It answers the subset of llama-server's protocol that the one client in
`plugins.llama_server` uses, with the JSON shapes of the recorded fixtures, so real and
simulated replicas go through the same code.

Rules it keeps:
- Until `ready` is set, every known route answers 503 `Loading model`, as llama-server does.
- Tokens are words drawn from a PRNG seeded with sha256(seed, prompt): the same seed and prompt
  give the same text, another seed other text (seed -1 picks one at random). Except, as with
  llama-server, on a warm slot: a /completion with `cache_prompt` whose prompt starts as what
  its slot last held (prompt and text) evaluates only the rest, in other batch shapes, which
  moves the logits; with temperature > 0 the text then differs from a cold run's.
- Each request streams at `tokens_per_s` after `first_token_ms`; the first request the server
  serves waits `first_request_extra_ms` more (a real engine's cold start: lazy allocations,
  kernel loading), which the daemon's warm-up request absorbs. At most `slots` requests
  generate at once, the rest wait for a slot in arrival order.
- A client that closes its connection stops its generation and frees its slot.
- A prompt that leaves no room in the context is refused with llama-server's 400.
- `stop` strings end the text before the first one (`stop_type` "word").
- The die_after_tokens fault (`plugins.sim_faults`) strikes between tokens.

Standard library only: the sim child runs without site-packages (`python -S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from plugins import sim_chat, sim_faults, sim_http

VERSION = "0.1.0"
BUILD_INFO = f"sim-{VERSION}"

_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her an they which or be this "
    "river stone light cloud garden window lantern harbor meadow signal engine thread pocket "
    "copper silver orange violet amber quiet rapid gentle distant hollow bright narrow open "
    "walks turns sings waits drifts builds opens folds lifts carries gathers follows answers "
    "morning evening winter summer north south island valley bridge tower market letter"
)
WORDS = tuple(_VOCABULARY.split())

LOADING = sim_http.HttpError(503, "Loading model", "unavailable_error")
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
ROUTES = {
    ("GET", "/health"),
    ("GET", "/props"),
    ("GET", "/slots"),
    ("POST", "/completion"),
    *(("POST", path) for path in CHAT_PATHS),
}

Emit = Callable[[dict[str, Any]], Awaitable[None]]


def prompt_tokens(prompt: str) -> int:
    """A crude token count: one per word, plus BOS."""
    return len(prompt.split()) + 1


def tokens(seed: int, prompt: str) -> random.Random:
    """The deterministic token source of one request."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return random.Random(digest)


class Slots:
    """At most `n` generations at once; others wait in arrival order."""

    def __init__(self, n: int) -> None:
        self.busy = [False] * n
        self.held = [""] * n  # what each slot's KV cache holds: its last prompt and text
        self._free = asyncio.Semaphore(n)

    async def acquire(self) -> int:
        await self._free.acquire()
        slot = self.busy.index(False)
        self.busy[slot] = True
        return slot

    def release(self, slot: int) -> None:
        self.busy[slot] = False
        self._free.release()


class Server:
    """One simulated llama-server; `sim_server.serve` sets `ready` once the VRAM is booked."""

    def __init__(
        self,
        *,
        model: str,
        ctx: int,
        slots: int,
        tokens_per_s: float,
        first_token_ms: float,
        faults: sim_faults.Faults,
        first_request_extra_ms: float = 0.0,
    ) -> None:
        self.model, self.ctx = model, ctx
        self.tokens_per_s, self.first_token_ms = tokens_per_s, first_token_ms
        self.cold_ms = first_request_extra_ms  # paid once, by the first request
        self.faults = faults
        self.slots = Slots(slots)
        self.ready = False

    async def route(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; return False when the connection must close afterwards."""
        if (method, path) not in ROUTES:
            raise sim_http.HttpError(404, "File Not Found", "not_found_error")
        if not self.ready:
            raise LOADING
        if path == "/health":
            await sim_http.send_json(writer, 200, {"status": "ok"})
        elif path == "/props":
            await sim_http.send_json(writer, 200, self.props())
        elif path == "/slots":
            slots = [
                {"id": i, "n_ctx": self.ctx, "speculative": False, "is_processing": busy}
                for i, busy in enumerate(self.slots.busy)
            ]
            await sim_http.send_json(writer, 200, slots)
        elif path in CHAT_PATHS:
            answer = sim_chat.plan(
                sim_http.parse_json(body), ctx=self.ctx, vocabulary=WORDS, count=prompt_tokens
            )
            return await self.watched(self.respond_chat(answer, writer), reader)
        else:
            params = self.params(sim_http.parse_json(body))
            return await self.watched(self.respond(params, writer), reader)
        return True

    def props(self) -> dict[str, Any]:
        return {
            "default_generation_settings": {
                "params": {
                    "seed": 4294967295,
                    "temperature": 0.8,
                    "top_k": 40,
                    "top_p": 0.95,
                    "n_predict": -1,
                },
                "n_ctx": self.ctx,
            },
            "total_slots": len(self.slots.busy),
            "model_alias": self.model,
            "model_path": self.model,
            "build_info": BUILD_INFO,
            "is_sleeping": False,
            "endpoint_slots": True,
            "endpoint_metrics": False,
        }

    async def watched(self, answer: Awaitable[None], reader: asyncio.StreamReader) -> bool:
        """Send `answer` while watching the client: EOF on its side means it closed the
        request, and the answer stops. False when the connection must close afterwards."""
        work = asyncio.ensure_future(answer)
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

    def params(self, body: dict[str, Any]) -> dict[str, Any]:
        """A /completion body checked and resolved: prompt, token counts, seed, settings."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise sim_http.HttpError(400, '"prompt" must be a string', "invalid_request_error")
        n_prompt = prompt_tokens(prompt)
        if n_prompt >= self.ctx:
            raise sim_http.HttpError(
                400,
                "the request exceeds the available context size, try increasing it",
                "exceed_context_size_error",
            )
        n_predict = int(body.get("n_predict", body.get("max_tokens", -1)))
        room = self.ctx - n_prompt
        seed = int(body.get("seed", -1))
        if seed < 0:
            seed = random.SystemRandom().randrange(2**32)
        stream = bool(body.get("stream", False))
        stop = body.get("stop") or []
        return {
            "cache_prompt": bool(body.get("cache_prompt", True)),  # llama-server's default
            "stop": [stop] if isinstance(stop, str) else [str(s) for s in stop],
            "prompt": prompt,
            "n_prompt": n_prompt,
            "n": room if n_predict < 0 else min(n_predict, room),
            # as llama-server: the context fills before the limit asked for (or, without
            # one, generation runs until it does)
            "truncated": n_predict < 0 or n_predict > room,
            "seed": seed,
            "stream": stream,
            "settings": {
                "seed": seed,
                "temperature": body.get("temperature", 0.8),
                "top_k": body.get("top_k", 40),
                "top_p": body.get("top_p", 0.95),
                "n_predict": n_predict,
                "stream": stream,
            },
        }

    async def respond(self, params: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        slot = await self.slots.acquire()
        try:
            if params["stream"]:
                sim_http.start_events(writer)

                async def emit(frame: dict[str, Any]) -> None:
                    await sim_http.send_event(writer, frame)

                await emit(await self.generate(params, slot, emit))
                await sim_http.end_events(writer)
            else:
                texts: list[str] = []

                async def collect(frame: dict[str, Any]) -> None:
                    texts.append(frame["content"])

                final = await self.generate(params, slot, collect)
                await sim_http.send_json(writer, 200, final | {"content": "".join(texts)})
        finally:
            self.slots.release(slot)

    async def paced(self, n: int, send: Callable[[int], Awaitable[None]]) -> float:
        """`send(i)` for each of `n` tokens at the configured pace (the die_after_tokens fault
        strikes between them); the decode time in ms comes back."""
        loop = asyncio.get_running_loop()
        sim_faults.after_tokens(self.faults, 0)
        start = loop.time()
        prompt_ms = self.first_token_ms + self.cold_ms
        self.cold_ms = 0.0
        first = start + prompt_ms / 1000
        for i in range(n):
            delay = first + i / self.tokens_per_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(i)
            sim_faults.after_tokens(self.faults, i + 1)
        return max((loop.time() - start) * 1000 - self.first_token_ms, 0.001)

    async def generate(self, params: dict[str, Any], slot: int, emit: Emit) -> dict[str, Any]:
        """Emit one frame per token at the configured pace; return the final frame."""
        prompt, held = params["prompt"], self.slots.held[slot]
        warm = params["cache_prompt"] and bool(prompt) and held[:1] == prompt[:1]
        shifted = warm and float(params["settings"]["temperature"] or 0) > 0
        rng = tokens(params["seed"], prompt + ("\0warm" if shifted else ""))
        ids = [rng.randrange(len(WORDS)) for _ in range(params["n"])]
        texts, stopped = sim_chat.cut([" " + WORDS[t] for t in ids], params["stop"])
        self.slots.held[slot] = prompt + "".join(texts)

        async def send(i: int) -> None:
            await emit(
                {
                    "index": 0,
                    "content": texts[i],
                    "tokens": [ids[i] + 3],
                    "stop": False,
                    "id_slot": -1,
                    "tokens_predicted": i + 1,
                    "tokens_evaluated": params["n_prompt"],
                }
            )

        predicted_ms = await self.paced(len(texts), send)
        n = len(texts)
        return {
            "index": 0,
            "content": "",
            "tokens": [],
            "id_slot": slot,
            "stop": True,
            "model": self.model,
            "tokens_predicted": n,
            "tokens_evaluated": params["n_prompt"],
            "generation_settings": params["settings"],
            "prompt": params["prompt"],
            "has_new_line": False,
            "truncated": params["truncated"] and not stopped,
            "stop_type": "word" if stopped else "limit",
            "stopping_word": "",
            "tokens_cached": params["n_prompt"] + n,
            "timings": self.timings(params["n_prompt"], n, predicted_ms),
        }

    async def respond_chat(self, answer: sim_chat.Plan, writer: asyncio.StreamWriter) -> None:
        """A chat answer (decided by `sim_chat.plan`), streamed or whole, paced like tokens."""
        slot = await self.slots.acquire()
        try:
            sent: list[dict[str, Any]] = []
            if answer.stream:
                sim_http.start_events(writer)

                async def send(i: int) -> None:
                    sent.append(answer.pieces[i])
                    chunk = sim_chat.chunk(answer, self.model, answer.pieces[i])
                    await sim_http.send_event(writer, chunk)

            else:

                async def send(i: int) -> None:
                    sent.append(answer.pieces[i])

            predicted_ms = await self.paced(len(answer.pieces), send)
            timings = self.timings(answer.n_prompt, len(sent), predicted_ms)
            if not answer.stream:
                whole = sim_chat.answer_json(answer, self.model, sent, timings)
                await sim_http.send_json(writer, 200, whole)
                return
            last = sim_chat.chunk(answer, self.model, {}, answer.finish) | {"timings": timings}
            await sim_http.send_event(writer, last)
            if answer.include_usage:
                usage = sim_chat.chunk(answer, self.model, {}) | {
                    "choices": [],
                    "usage": sim_chat.usage(answer, len(sent)),
                    "timings": timings,
                }
                await sim_http.send_event(writer, usage)
            await sim_http.send_done(writer)
            await sim_http.end_events(writer)
        finally:
            self.slots.release(slot)

    def timings(self, n_prompt: int, n: int, predicted_ms: float) -> dict[str, Any]:
        prompt_ms = self.first_token_ms
        return {
            "cache_n": 0,
            "prompt_n": n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / n_prompt,
            "prompt_per_second": n_prompt * 1000 / max(prompt_ms, 0.001),
            "predicted_n": n,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / n if n else 0.0,
            "predicted_per_second": n * 1000 / predicted_ms,
        }
