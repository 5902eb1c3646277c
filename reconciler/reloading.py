"""Reloading a pool onto another model, atomically and reversibly (ORCH-3031/3038, HME-031).

POST /v1/pools/{id}/reload calls `Reloader.reload`. orch.yaml stays the one source of truth:
the daemon edits the file itself, in place and keeping its layout (`editing`), and the loop
applies the edit like any other (after the usual settle time). Steps, one reload at a time:

1. The edit is made on the text and checked like an edit by hand (schema, references, device
   indices, a resolver for the ref's scheme); an edit that would not apply is refused (400)
   and nothing is written.
2. The new text replaces orch.yaml atomically, with the file's permissions kept; the pool's
   drain, if any, is lifted (a reload is how a drained pool comes back): its record stays
   until the reload has succeeded (it only matches the old spec, so the new one is served),
   and stays in force if the reload fails; lifted at once when nothing in the file changes.
3. The reload waits until the pool has as many Ready replicas of the new spec as it wants, up
   to `timeout_s` (default `timeouts.ready_s`). It gives up early when a new replica fails
   (crash, digest mismatch: BackingOff or Failed), the pool cannot start or be placed, or
   another edit of orch.yaml is applied meanwhile. Until the reload ends (rolled back
   included), the pool never counts as Failed to admission: tasks sent meanwhile wait for it.
4. Success answers with the new revision. Otherwise the old bytes are written back exactly
   (and the drain restored), so the loop goes back to the old spec, and the answer is 409
   RELOAD_FAILED with the reason. If someone else changed orch.yaml in the meantime, their
   file is left alone and the answer says so.

A reload without `model` or `model_ref` (or with the values the pool already has) only lifts
a drain and waits for the pool to be Ready.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from plugins import resolvers
from reconciler import clocks, editing, logs, pools, specs
from reconciler.configuring import AppliedConfig
from state import atomic, desired, drains
from state.errors import ErrorCode

log = logs.get("config")

POLL_S = 0.05


class ReloadError(Exception):
    """The reload did not happen or was rolled back; the HTTP face answers with `code`."""

    def __init__(self, code: ErrorCode, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Reloaded:
    pool_id: str
    model: str
    model_ref: str
    revision: str | None
    previous_revision: str | None
    replicas: list[str]
    changed: bool  # orch.yaml was edited (False: only a drain was lifted)
    took_ms: int


@dataclass
class Reloader:
    config: AppliedConfig
    runtime: pools.PoolRuntime
    clock: clocks.Clock
    wake: Callable[[], None]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stopping: Callable[[], bool] = lambda: False  # the daemon stops: no pool will be Ready

    async def reload(
        self,
        pool_id: str,
        *,
        model: str | None = None,
        model_ref: str | None = None,
        timeout_s: float | None = None,
    ) -> Reloaded:
        async with self.lock:
            # while the pool changes spec (and, on failure, changes back) a Failed moment is
            # not a reason to fail the tasks waiting for it: they wait (PoolRuntime.views)
            state = self.config.state
            before = state.pool(pool_id) if state is not None else None
            if before is not None:  # the model it serves now: back to it if the reload fails
                self.runtime.reloading[pool_id] = before.model
            try:
                return await self._reload(pool_id, model, model_ref, timeout_s)
            finally:
                self.runtime.reloading.pop(pool_id, None)
                if not _ending():  # answered (or failed and rolled back): nothing to undo
                    _forget(self.runtime.state_dir)
                self.wake()

    async def _reload(
        self, pool_id: str, model: str | None, model_ref: str | None, timeout_s: float | None
    ) -> Reloaded:
        began = self.clock.monotonic()
        state = self.config.state
        if state is None or self.config.from_last_good or self.config.errors:
            raise ReloadError(
                ErrorCode.RELOAD_FAILED,
                f"{self.config.path.name} has errors, so the daemon serves an older revision; "
                "fix the file before reloading",
                hint="`orchctl validate orch.yaml` shows the errors",
            )
        pool = state.pool(pool_id)
        if pool is None:
            raise ReloadError(ErrorCode.NOT_FOUND, f"no pool {pool_id!r} in orch.yaml")
        if model_ref is not None:
            self._check_api_ref(model_ref, state)
        old = await asyncio.to_thread(self._read)
        if hashlib.sha256(old).hexdigest() != self.config.applied_digest:
            # an edit not applied yet (a save still being written waits to settle): editing
            # its bytes would apply half a file at once, and the editor's next write would
            # go to the file the reload replaced, lost
            raise ReloadError(
                ErrorCode.RELOAD_FAILED,
                f"{self.config.path.name} holds an edit the daemon has not applied yet (a save "
                "still being written, or one it refused); nothing was changed",
                hint="wait until `orchctl status` shows the edit applied (a save in place is "
                "applied once unchanged for 2 s), or fix what it reports, then reload again",
            )
        new = self._edited(old, pool, model, model_ref)
        new_state = await asyncio.to_thread(self._check, new)
        new_pool = new_state.pool(pool_id)
        if new_pool is None:  # the edit keeps the pool's entry: a pool gone is no edit of ours
            raise ReloadError(ErrorCode.NOT_FOUND, f"no pool {pool_id!r} in orch.yaml")
        new_model = new_state.models[new_pool.model]
        if new_model.state == "Retired":  # its pools are unloaded: it would never be Ready
            raise ReloadError(
                ErrorCode.RELOAD_FAILED,
                f"model {new_pool.model!r} is Retired in orch.yaml, so pool {pool_id} cannot "
                "serve it; nothing was changed",
                hint=f"set models.{new_pool.model}.state: Active in orch.yaml, or reload the "
                "pool onto another model",
            )
        self._check_ref(new_model.ref)
        expected = specs.spec_hash(new_pool, new_model, new_state.engines.get(new_pool.engine))
        was = specs.spec_hash(pool, state.models[pool.model], state.engines.get(pool.engine))
        previous = self.config.revision
        # a drain's record matches the old spec only: the edited pool is served while it
        # stays, until the reload succeeds (lifted before the file is written, a pass in
        # between would serve the old spec again, and a failed reload would have to put it
        # back after the old file is applied again); kept as it was if the reload fails
        lifted = self.runtime.drained.get(pool_id)
        # a pool whose replicas failed too often (their breaker open) is asked for again
        self.runtime.retry_pool(pool_id, "a reload of its pool was requested")
        if new == old:
            self.runtime.undrain(pool_id, "reload requested")
        else:
            try:
                # first: a daemon killed before the reload answers finds it at its next start
                # and puts the old file back (`restore_interrupted`), as a failure would
                await asyncio.to_thread(_journal, self.runtime.state_dir, pool_id, old, new)
                await asyncio.to_thread(self._write, new)
            except OSError as exc:
                _forget(self.runtime.state_dir)
                raise ReloadError(
                    ErrorCode.RELOAD_FAILED,
                    f"{self.config.path} cannot be written ({exc.strerror or exc}); "
                    "nothing changed",
                ) from None
            logs.emit(
                log,
                "config.reload_written",
                f"Reloading pool {pool_id}: wrote {self.config.path.name} "
                f"(model {new_pool.model}, ref {new_model.ref}).",
                pool_id=pool_id,
            )
        self.wake()
        limit = timeout_s if timeout_s is not None else state.timeouts.ready_s
        why, ready = await self._wait(
            pool_id, old, new, expected, new_pool.replicas, began + limit, lifted
        )
        drained = self._drained_meanwhile(pool_id, lifted)
        if why is None:
            if drained is not None:  # requested in the moment after the last look: kept
                self.runtime.redrain(drained.model_copy(update={"spec_hash": expected}))
            else:
                self.runtime.undrain(pool_id, "reloaded onto a new spec")  # held for a failure
            took = round((self.clock.monotonic() - began) * 1000)
            logs.emit(
                log,
                "config.reloaded",
                f"Reloaded pool {pool_id} in {took} ms (revision {self.config.revision}).",
                pool_id=pool_id,
                revision=self.config.revision,
            )
            return Reloaded(
                pool_id,
                new_pool.model,
                new_model.ref,
                self.config.revision,
                previous,
                ready,
                new != old,
                took,
            )
        if drained is not None:
            # the operator's drain outlasts the reload it made fail: it is kept, on the spec
            # the pool goes back to (its record named the spec of the moment)
            lifted = drained.model_copy(update={"spec_hash": was})
        hint = (
            f"pool {pool_id} stays drained as requested: reload it again to bring it back"
            if drained is not None
            else None
        )
        raise await self._roll_back(pool_id, old, new, lifted, why, previous, limit, hint)

    def _drained_meanwhile(self, pool_id: str, lifted: drains.Drain | None) -> drains.Drain | None:
        """The pool's drain when one was requested after the reload began (not the one the
        reload lifts), else None."""
        now = self.runtime.drained.get(pool_id)
        return None if now is None or now == lifted else now

    # -- the file -------------------------------------------------------------------------------

    def _read(self) -> bytes:
        path = self.config.path
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ReloadError(
                ErrorCode.RELOAD_FAILED, f"{path} is not a regular file; it cannot be edited"
            )
        return path.read_bytes()

    def _write(self, data: bytes) -> None:
        path = self.config.path
        mode = stat.S_IMODE(os.stat(path).st_mode)
        atomic.write_bytes(path, data, mode=mode)

    def _edited(
        self, old: bytes, pool: desired.PoolSpec, model: str | None, model_ref: str | None
    ) -> bytes:
        try:
            text = old.decode("utf-8")
            if model is not None:
                text = editing.set_pool_model(text, pool.id, model)
            if model_ref is not None:
                text = editing.set_model_ref(text, pool.model, model_ref)
        except UnicodeDecodeError:
            raise ReloadError(ErrorCode.RELOAD_FAILED, "orch.yaml is not UTF-8") from None
        except editing.EditRefused as exc:
            raise ReloadError(
                ErrorCode.RELOAD_FAILED,
                str(exc),
                hint="nothing was written: change the value in orch.yaml by hand; the loop "
                "applies it like any edit",
            ) from None
        return text.encode("utf-8")

    def _check(self, data: bytes) -> desired.DesiredState:
        """The edited file's desired state, checked as the loop will check it."""
        state_dir = self.runtime.state_dir
        probe = state_dir / f".reload-{os.getpid()}.yaml"
        try:
            probe.write_bytes(data)
            loaded = desired.load_desired(probe, known_engines=self.config.known_engines)
        finally:
            probe.unlink(missing_ok=True)
        problems = loaded.errors
        if loaded.value is not None:
            problems = self.config.device_errors(loaded.value)
        if loaded.value is None or problems:
            first = problems[0]
            where = f"{first.field}: " if first.field else ""
            raise ReloadError(
                ErrorCode.INVALID_PARAMS,
                f"the reload would make orch.yaml invalid: {where}{first.message}",
                hint=first.hint or None,
            )
        return loaded.value

    def _check_api_ref(self, ref: str, state: desired.DesiredState) -> None:
        """A ref sent over the API is held to what a model file may be: a file under
        orch.yaml's folder, paths.catalog or the model cache, or a download over https (hf:,
        https:). Otherwise any API caller could point a model at any file the daemon may read
        (and a verify would tell its size and digest), or have it fetch from any address."""
        scheme, _, rest = ref.partition(":") if ":" in ref else ("file", "", ref)
        if scheme == "http":
            raise ReloadError(
                ErrorCode.INVALID_PARAMS,
                "model_ref: a plain http: ref is not taken over the API (the daemon would fetch "
                "from any address, unencrypted); nothing was written",
                hint="use https: or hf:, or write the ref in orch.yaml by hand",
            )
        if scheme != "file":
            return
        base = self.config.base
        path = Path(os.path.realpath(desired.resolve(base, rest)))
        roots = [base, desired.resolve(base, state.paths.catalog), resolvers.model_cache()]
        if not any(path.is_relative_to(os.path.realpath(root)) for root in roots):
            raise ReloadError(
                ErrorCode.INVALID_PARAMS,
                f"model_ref: {path} is outside the folders a reload may name (orch.yaml's "
                "folder, paths.catalog, the model cache); nothing was written",
                hint="put the model file in the catalog folder, or write the ref in orch.yaml "
                "by hand",
            )

    def _check_ref(self, ref: str) -> None:
        """A ref no installed resolver reads would be written, then fail to start: refused
        first, as `orchctl validate` refuses it."""
        scheme = ref.split(":", 1)[0] if ":" in ref else "file"
        resolvers = self.runtime.plugins.resolvers
        if scheme not in resolvers:
            installed = ", ".join(f"{s}:" for s in sorted(resolvers))
            raise ReloadError(
                ErrorCode.INVALID_PARAMS,
                f"model_ref: no model resolver for {scheme}: refs is installed "
                f"(installed: {installed}); nothing was written",
                hint='use a ref such as "file:models/x.gguf" or "hf:owner/repo/file.gguf"',
            )

    # -- waiting ----------------------------------------------------------------------------

    async def _wait(
        self,
        pool_id: str,
        old: bytes,
        new: bytes,
        expected: str,
        wanted: int,
        deadline: float,
        lifted: drains.Drain | None,
    ) -> tuple[str | None, list[str]]:
        """(None, the Ready replicas) once the pool serves the new spec; else (why not, [])."""
        digest = hashlib.sha256(new).hexdigest()
        ours = {hashlib.sha256(old).hexdigest(), digest}
        seen_pass: int | None = None  # the runtime's pass count when the edit was applied
        progress = "the edit was not applied yet"
        while True:
            if self.stopping():  # its pools stop with it: answered now, orch.yaml put back
                return "the daemon is stopping", []
            drained = self._drained_meanwhile(pool_id, lifted)
            if drained is not None:  # it serves nothing now: never Ready on the new spec
                return (
                    f"the pool was drained on request during the reload "
                    f"(at {drained.drained_at}); it stays drained",
                    [],
                )
            if self.config.applied_digest not in ours and not self.config.errors:
                # another edit of orch.yaml was applied meanwhile: one made on top of the
                # reload's that keeps the pool on the new spec (a queue setting changed) is
                # waited out as ours; one that changes the pool ends the reload
                if self._applied_hash(pool_id) != expected:
                    return "orch.yaml was changed by another edit during the reload", []
                digest = self.config.applied_digest or digest
                ours.add(digest)
            if self.config.applied_digest != digest:
                if self.config.errors:
                    return f"the edited orch.yaml was not applied: {self.config.errors[0]}", []
            else:
                if seen_pass is None:
                    progress = "the edit was applied; the pool was not judged on it yet"
                seen_pass = self.runtime.passes if seen_pass is None else seen_pass
                # judge the pool only on a pass that ran with the new config
                if self.runtime.passes > seen_pass:
                    failed, progress, ready = self._judge(pool_id, expected, wanted)
                    if failed is not None:
                        return failed, []
                    if ready is not None:
                        return None, ready
            if self.clock.monotonic() >= deadline:
                return f"not Ready in time ({progress})", []
            await self.clock.sleep(POLL_S)

    def _applied_hash(self, pool_id: str) -> str | None:
        """The spec hash of `pool_id` in the config the loop applied last (None: no pool)."""
        state = self.config.state
        pool = state.pool(pool_id) if state is not None else None
        if state is None or pool is None or pool.model not in state.models:
            return None
        return specs.spec_hash(pool, state.models[pool.model], state.engines.get(pool.engine))

    def _judge(
        self, pool_id: str, expected: str, wanted: int
    ) -> tuple[str | None, str, list[str] | None]:
        """(why it failed, progress so far, the Ready replicas once there are enough)."""
        runtime = self.runtime
        if (problem := runtime.problems.get(pool_id)) is not None:
            return problem, "", None
        if (unschedulable := runtime.unschedulable.get(pool_id)) is not None:
            return f"the pool cannot be placed: {unschedulable.message}", "", None
        new = sorted(
            (
                r
                for r in runtime.replicas.values()
                if r.pool_id == pool_id and r.spec.spec_hash == expected
            ),
            key=lambda r: r.replica_id,
        )
        for r in new:
            if r.state in ("BackingOff", "Failed"):
                why = r.life.last_error or f"it is {r.state}"
                return f"replica {r.replica_id} failed: {why}", "", None
        ready = [str(r.replica_id) for r in new if r.state == "Ready"]
        if len(ready) >= wanted:
            return None, "", ready
        shown = ", ".join(f"{r.replica_id} {r.state}" for r in new) or "no replica started yet"
        if (downloading := runtime.downloading.get(pool_id)) is not None:
            shown = f"{shown}; its model file: {downloading}"  # a download failing, retried
        return None, shown, None

    # -- rolling back -----------------------------------------------------------------------

    async def _roll_back(
        self,
        pool_id: str,
        old: bytes,
        new: bytes,
        lifted: drains.Drain | None,
        why: str,
        previous: str | None,
        limit: float,
        hint: str | None = None,
    ) -> ReloadError:
        """Put the old file (and drain) back; the error to answer with."""
        restored = "nothing in orch.yaml needed restoring"
        hint = (
            hint or "fix the model file or ref and reload again (`orchctl status` shows the pool)"
        )
        if lifted is not None:  # first: the old spec comes back to a pool drained as before
            self.runtime.redrain(lifted)
        if new != old:
            current = await asyncio.to_thread(self.config.path.read_bytes)
            if current == new:
                await asyncio.to_thread(self._write, old)
                restored = f"orch.yaml is restored byte for byte (revision {previous})"
                hint = "The old orch.yaml is back in place; " + hint
                if not self.stopping():  # a stopping loop applies nothing more
                    await self._until_applied(old)  # tasks waiting for the pool keep waiting
            else:
                restored = "orch.yaml was changed by someone else meanwhile, so it is left as is"
                hint = "orch.yaml holds the other edit now: check it, then reload again"
        self.wake()
        logs.emit(
            log,
            "config.reload_failed",
            f"Reload of pool {pool_id} failed: {why}; {restored}.",
            level=40,
            pool_id=pool_id,
        )
        within = f" within {limit:g} s" if why.startswith("not Ready in time") else ""
        if self.stopping():
            return ReloadError(
                ErrorCode.DAEMON_STOPPING,
                f"pool {pool_id!r} was not reloaded: {why}; {restored}",
                hint="reload it again once the daemon serves again",
            )
        return ReloadError(
            ErrorCode.RELOAD_FAILED,
            f"pool {pool_id!r} did not become Ready on the new spec{within}: {why}; {restored}",
            hint=hint,
        )

    async def _until_applied(self, data: bytes, timeout_s: float = 5.0) -> None:
        """Wait (a little) until the loop applied `data` again, so the pool is judged on the
        spec it is going back to."""
        digest = hashlib.sha256(data).hexdigest()
        end = self.clock.monotonic() + timeout_s
        while self.config.applied_digest != digest and self.clock.monotonic() < end:
            if self.config.errors:
                return
            await self.clock.sleep(POLL_S)
        passes = self.runtime.passes
        while self.runtime.passes == passes and self.clock.monotonic() < end:
            await self.clock.sleep(POLL_S)  # one pass on it: the old replica is back in plan


# -- a reload cut short -----------------------------------------------------------------------

JOURNAL = "reload-pending.json"


def _journal(state_dir: Path, pool_id: str, old: bytes, new: bytes) -> None:
    """Record, durably, a reload about to write `new` over `old`, until it answers."""
    record = {
        "pool_id": pool_id,
        "old": base64.b64encode(old).decode(),
        "new_sha256": hashlib.sha256(new).hexdigest(),
    }
    atomic.write_json(state_dir / JOURNAL, record)


def _forget(state_dir: Path) -> None:
    atomic.remove(state_dir / JOURNAL)


def _ending() -> bool:
    """Whether the reload is being cut short by the daemon's stop (its task canceled): the
    journal then stays, and the next start undoes the edit nobody was answered about."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def restore_interrupted(config_path: Path, state_dir: Path) -> str | None:
    """At the daemon's start, before it applies orch.yaml: a reload the previous daemon wrote
    but never answered (killed, or stopped, while it waited) is undone as a failed one is:
    the old bytes go back when orch.yaml still holds the reload's edit; an edit made since is
    left alone. Returns what was done, for the log (None: no reload was cut short)."""
    path = state_dir / JOURNAL
    try:
        record = json.loads(path.read_bytes())
        pool_id, old = str(record["pool_id"]), base64.b64decode(record["old"])
        new_sha256 = str(record["new_sha256"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # cut short itself: nothing was written
        _forget(state_dir)
        return None
    try:
        current = config_path.read_bytes()
    except OSError:
        current = b""
    if hashlib.sha256(current).hexdigest() == new_sha256:
        mode = stat.S_IMODE(os.stat(config_path).st_mode)
        atomic.write_bytes(config_path, old, mode=mode)
        done = (
            f"a reload of pool {pool_id} was cut short by the daemon's stop before it answered: "
            f"{config_path.name} is restored byte for byte, as a failed reload restores it"
        )
    else:
        done = (
            f"a reload of pool {pool_id} was cut short by the daemon's stop before it answered; "
            f"{config_path.name} was changed since, so it is left as is"
        )
    _forget(state_dir)
    return done
