"""The smoke test `orchctl up` runs once the pools are Ready: a task streams, a cancel stops
its tokens, and the same seed twice gives the same text (HME-040, in one minute).

It speaks to the daemon only through its files, as any client may: task files delivered into
the spool, cancel requests into spool/cancel/, and the result and event files read back. So
what it proves is what a user's tasks will meet. `smoke` never raises for a failed check: it
returns every check with what it saw, and the caller prints them and picks the exit code.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from state import desired, events, results, spool

POLL_S = 0.05
PROMPT = "Write one sentence about graphics cards."
MAX_CANCEL_TOKENS = 2000  # long enough to still be running when the cancel lands
PROMPT_ROOM = 64  # context tokens left for PROMPT and the template (it is about 10)


@dataclass(frozen=True)
class Outcome:
    name: str
    ok: bool
    detail: str


@dataclass
class Smoke:
    the_spool: spool.Spool
    store: results.ResultStore
    model: str
    max_cancel_tokens: int = MAX_CANCEL_TOKENS  # fitted to the pools: `cancel_tokens`
    budget_s: float = 60.0
    run_id: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))
    deadline: float = 0.0
    pool: str | None = None  # where the first task ran: the seed tasks are pinned there

    async def run(self) -> list[Outcome]:
        self.deadline = time.monotonic() + self.budget_s
        found = []
        for check in (self.streams, self.cancel_stops_tokens, self.same_seed_same_text):
            try:
                found.append(await check())
            except TimeoutError as exc:
                found.append(Outcome(check.__name__.replace("_", " "), False, str(exc)))
        return found

    # -- the checks ---------------------------------------------------------------------------

    async def streams(self) -> Outcome:
        name = "a task streams"
        task_id = self._submit("stream", max_tokens=32, seed=1, temperature=0.7)
        began = time.monotonic()
        ended = await self._first_token(task_id, "no token")
        first_ms = (time.monotonic() - began) * 1000
        result = ended or await self._terminal(task_id)
        frames = self._tokens(task_id)
        if result.status != "succeeded" or frames < 1:
            return Outcome(name, False, f"{task_id} ended {_why(result)} after {frames} tokens")
        self.pool = result.pool_id  # GPUs of two kinds may round differently: compare on one
        decode_ms = result.timings.decode_time_ms
        rate = f", {result.tokens_out * 1000 / decode_ms:.0f} tokens/s" if decode_ms else ""
        return Outcome(
            name,
            True,
            f"{frames} tokens streamed, the first after {first_ms:.0f} ms{rate} "
            f"({result.pool_id} on {_gpu(result)})",
        )

    async def cancel_stops_tokens(self) -> Outcome:
        name = "a cancel stops tokens"
        limit = self.max_cancel_tokens
        ended_first: list[str] = []
        for seed in (2, 3, 4):  # a model may end an answer (EOS) before the cancel reaches it
            task_id = self._submit("cancel", max_tokens=limit, seed=seed, temperature=0.7)
            outcome = await self._cancel_one(name, task_id, limit)
            if outcome is not None:
                return outcome
            ended_first.append(task_id)
        return Outcome(
            name,
            False,
            f"not checked: the model ended each of {', '.join(ended_first)} on its own before "
            "the cancel reached it (short answers); the daemon is not at fault",
        )

    async def _cancel_one(self, name: str, task_id: str, limit: int) -> Outcome | None:
        """The outcome of canceling `task_id` at its first token; None when the task ended
        by itself first (the model's own end, short of `limit`)."""
        ended = await self._first_token(task_id, "no token to cancel")
        if ended is not None and not self._tokens(task_id):  # refused, or failed at once
            return Outcome(name, False, f"{task_id} ended {_why(ended)} before its first token")
        asked = time.monotonic()
        spool.request_cancel(self.the_spool, task_id)
        result = await self._terminal(task_id)
        stopped_ms = (time.monotonic() - asked) * 1000
        at_end = self._frames(task_id)
        await asyncio.sleep(0.5)  # nothing may follow the terminal frame
        later = self._frames(task_id)
        if (
            result.status == "succeeded"
            and result.finish_reason == "stop"
            and result.tokens_out < limit
        ):
            return None
        if result.status != "canceled":
            return Outcome(name, False, f"{task_id} ended {_why(result)}, not canceled")
        if later != at_end or result.tokens_out >= limit:
            return Outcome(name, False, f"tokens kept coming after the cancel of {task_id}")
        return Outcome(
            name,
            True,
            f"canceled after {result.tokens_out} of {limit} tokens, stopped {stopped_ms:.0f} ms "
            "after the request",
        )

    async def same_seed_same_text(self) -> Outcome:
        name = "the same seed gives the same text"
        texts = []
        for label, seed in (("seed-a", 1234), ("seed-b", 1234), ("seed-c", 4321)):
            # one at a time, on one pool: batching or another GPU model can change the floats
            task_id = self._submit(label, max_tokens=24, seed=seed, temperature=0.8, pin=self.pool)
            result = await self._terminal(task_id)
            if result.status != "succeeded":
                return Outcome(name, False, f"{task_id} ended {_why(result)}")
            texts.append(result.text)
        if texts[0] != texts[1]:
            return Outcome(name, False, f"seed 1234 gave {texts[0]!r}, then {texts[1]!r}")
        other = "another seed gave other text" if texts[2] != texts[0] else "so did another seed"
        where = f" on pool {self.pool}" if self.pool else ""
        return Outcome(name, True, f"{len(texts[0])} characters matched twice{where}; {other}")

    # -- files --------------------------------------------------------------------------------

    def _submit(
        self, label: str, *, max_tokens: int, seed: int, temperature: float, pin: str | None = None
    ) -> str:
        task_id = f"smoke-{self.run_id}-{label}"
        task: dict[str, Any] = {
            "task_id": task_id,
            "model": self.model,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "seed": seed,
            "priority": "interactive",
            "sampling": {"temperature": temperature},
            "labels": {"smoke": self.run_id},
        }
        if pin is not None:
            task["placement"] = {"mode": "pin", "pin_pool": pin}
        spool.deliver(self.the_spool, json.dumps(task).encode(), name=f"{task_id}.task.json")
        return task_id

    def _frames(self, task_id: str) -> int:
        return sum(1 for _ in events.read(self.store.events_path(task_id)))

    def _tokens(self, task_id: str) -> int:
        path = self.store.events_path(task_id)
        return sum(1 for f in events.read(path) if f.event == "token")

    async def _first_token(self, task_id: str, what: str) -> results.Result | None:
        """Wait for the task's first token, or its end (a task refused or failed at once has
        none to wait for: its result says why, now, not at the end of the budget)."""
        ended: results.Result | None = None

        def token_or_end() -> bool:
            nonlocal ended
            if self._tokens(task_id) > 0:
                return True
            found = self.store.read(task_id)
            ended = found if found is not None and found.terminal else None
            return ended is not None

        await self._until(token_or_end, f"{task_id}: {what}")
        return ended

    async def _terminal(self, task_id: str) -> results.Result:
        found: results.Result | None = None

        def ended() -> bool:
            nonlocal found
            found = self.store.read(task_id)
            return found is not None and found.terminal

        await self._until(ended, f"{task_id}: no result")
        assert found is not None
        return found

    async def _until(self, check: Any, what: str) -> bool:
        while time.monotonic() < self.deadline:
            if check():
                return True
            await asyncio.sleep(POLL_S)
        raise TimeoutError(f"{what} within the smoke's {self.budget_s:.0f} s")


def cancel_tokens(state: desired.DesiredState | None, model: str) -> int:
    """The cancel check's max_tokens: long enough to still be running when the cancel lands
    (2,000), but what every pool of `model` accepts (its max_tokens, and its context less
    room for the prompt), wherever placement puts the task."""
    limit = MAX_CANCEL_TOKENS
    for pool in state.pools if state is not None else ():
        if pool.model == model:
            room = pool.ctx - PROMPT_ROOM
            limit = min(limit, room, pool.max_tokens or room)
    return max(1, limit)


def _why(result: results.Result) -> str:
    if result.error is not None:
        return f"{result.status} ({result.error.code}: {result.error.message})"
    return result.status


def _gpu(result: results.Result) -> str:
    if result.gpu is None:
        return "an unknown GPU"
    name = result.gpu.name
    if result.gpu.simulated and "SIMULATED" not in name.upper():
        name += " (simulated)"
    return f"GPU {result.gpu.index} {name}"
