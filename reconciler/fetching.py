"""Model downloads for the pool runtime: each file fetched in a worker thread, off the loop.

`PoolRuntime.reconcile` calls `need` for every pool whose model a downloading resolver
(`hf:`, `https:`) serves and whose engine loads the file; the answer is what the pool shows:
`ready` (the file is in the model cache), `progressing` with the percent done, or `failed`
with the reason (a 404, a refused token, UNTRUSTED_ARTIFACT). Rules:

- One download per (ref, digest), shared by every pool of that model; a config edit that
  changes either starts another and `keep` stops the one no pool needs any more.
- The transfer runs in a daemon thread (`resolver.fetch` blocks); its progress callback only
  stores numbers and wakes the loop at most once a second.
- An interrupted transfer is retried with backoff (2 s doubling to 60 s, on the injected
  clock) and resumes from its `.part` file, as a restarted daemon does; a permanent failure
  holds the pool Failed until the ref or digest changes or the daemon restarts.
- `shutdown` asks every transfer to stop and waits briefly; the part stays for next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from plugins import downloads
from reconciler import clocks, logs
from state import desired

log = logs.get("fetching")

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 60.0
STOP_WAIT_S = 2.0
Key = tuple[str, str | None]  # (ref, digest)


@dataclass(frozen=True)
class Need:
    state: Literal["ready", "progressing", "failed"]
    message: str | None = None


@dataclass
class Fetch:
    model_id: str
    ref: str
    digest: str | None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: int = 0
    total: int | None = None
    job: asyncio.Task[None] | None = None
    error: str | None = None
    permanent: bool = False
    attempts: int = 0
    retry_at: float | None = None
    woke_at: float = 0.0


@dataclass
class Fetches:
    clock: clocks.Clock
    wake: Callable[[], None]
    jobs: dict[Key, Fetch] = field(default_factory=dict)

    def need(self, model_id: str, model: desired.ModelSpec, resolver: Any, base: Path) -> Need:
        """Whether `model`'s file is there; starts (or retries) its download when not."""
        problem = resolver.check(model.ref)
        if problem:
            return Need("failed", f"model {model_id!r}: {problem}")
        path: Path = resolver(model.ref, base).path
        if path.is_file():
            return Need("ready")
        key = (model.ref, model.digest)
        fetch = self.jobs.get(key)
        if fetch is None:
            fetch = self.jobs[key] = Fetch(model_id, model.ref, model.digest)
            fetch.done = downloads.partial_bytes(path)  # what an earlier run left
        if fetch.permanent:
            return Need("failed", fetch.error)
        idle = fetch.job is None or fetch.job.done()
        if idle and (fetch.retry_at is None or self.clock.monotonic() >= fetch.retry_at):
            self._start(fetch, resolver)
        return Need("progressing", self._describe(fetch))

    def keep(self, keys: Iterable[Key]) -> None:
        """Stop the downloads no pool needs any more (their parts stay for later)."""
        wanted = set(keys)
        for key in [k for k in self.jobs if k not in wanted]:
            self.jobs.pop(key).cancel.set()

    async def shutdown(self) -> None:
        jobs = []
        for fetch in self.jobs.values():
            fetch.cancel.set()
            if fetch.job is not None and not fetch.job.done():
                jobs.append(fetch.job)
        if jobs:
            _, late = await asyncio.wait(jobs, timeout=STOP_WAIT_S)
            for job in late:  # a thread stuck on a silent socket: leave it, it is a daemon
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
        self.jobs.clear()

    # -- the worker ---------------------------------------------------------------------------

    def _start(self, fetch: Fetch, resolver: Any) -> None:
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[BaseException | None] = loop.create_future()
        fetch.cancel.clear()
        fetch.retry_at = None

        def progress(done: int, total: int | None) -> None:
            fetch.done, fetch.total = done, total
            now = time.monotonic()
            if now - fetch.woke_at >= 1.0:
                fetch.woke_at = now
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                    loop.call_soon_threadsafe(self.wake)

        def work() -> None:
            outcome: BaseException | None = None
            try:
                resolver.fetch(
                    fetch.ref, digest=fetch.digest, progress=progress, cancel=fetch.cancel
                )
            except BaseException as exc:
                outcome = exc

            def settle() -> None:
                if not settled.done():
                    settled.set_result(outcome)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        if fetch.attempts == 0:
            logs.emit(
                log,
                "model.downloading",
                f"Downloading model {fetch.model_id} ({fetch.ref})"
                + (f", resuming at {size_text(fetch.done)}" if fetch.done else "")
                + ".",
                model_id=fetch.model_id,
                ref=fetch.ref,
            )
        threading.Thread(target=work, name=f"fetch-{fetch.model_id}", daemon=True).start()
        fetch.job = loop.create_task(self._finish(fetch, settled))

    async def _finish(self, fetch: Fetch, settled: asyncio.Future[BaseException | None]) -> None:
        outcome = await settled
        fetch.attempts += 1
        mine = self.jobs.get((fetch.ref, fetch.digest)) is fetch
        if outcome is None:
            fetch.error = None
            logs.emit(
                log,
                "model.downloaded",
                f"Downloaded model {fetch.model_id} ({size_text(fetch.done)}).",
                model_id=fetch.model_id,
                bytes=fetch.done,
            )
        elif isinstance(outcome, downloads.DownloadError):
            fetch.error = outcome.message
            if outcome.permanent:
                fetch.permanent = True
                fetch.error = _failed(fetch, outcome)
                if mine:
                    logs.emit(
                        log,
                        "model.download_failed",
                        f"Cannot download model {fetch.model_id}: {outcome.message}",
                        level=40,
                        model_id=fetch.model_id,
                    )
            else:
                delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (fetch.attempts - 1))
                fetch.retry_at = self.clock.monotonic() + delay
                if mine and not fetch.cancel.is_set():
                    logs.emit(
                        log,
                        "model.download_interrupted",
                        f"Download of model {fetch.model_id} interrupted ({outcome.message}); "
                        f"resuming in {delay:.0f} s.",
                        level=30,
                        model_id=fetch.model_id,
                    )
        else:  # a bug or a full disk: shown on the pool, not retried in a loop
            fetch.permanent = True
            fetch.error = (
                f"model {fetch.model_id!r}: download failed: {type(outcome).__name__}: {outcome}"
            )
        self.wake()

    def _describe(self, fetch: Fetch) -> str:
        head = f"downloading model {fetch.model_id!r} ({fetch.ref}): "
        if fetch.total:
            head += f"{100 * fetch.done // fetch.total}% of {size_text(fetch.total)}"
        else:
            head += f"{size_text(fetch.done)} so far"
        if fetch.retry_at is not None and fetch.error:
            wait = max(0.0, fetch.retry_at - self.clock.monotonic())
            head += f"; interrupted ({fetch.error}), resuming in {wait:.0f} s"
        return head


def _failed(fetch: Fetch, error: downloads.DownloadError) -> str:
    if isinstance(error, downloads.Untrusted):
        return error.message  # UNTRUSTED_ARTIFACT: … first, as for a file: model
    hint = ""
    if isinstance(error, downloads.NotFound):
        hint = f"; check models.{fetch.model_id}.ref (hf:ORG/REPO/FILE names a file in the repo)"
    return f"model {fetch.model_id!r} cannot be downloaded: {error.message}{hint}"


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
