"""The daemon: wires the loop together and runs it until asked to stop (`orchctl serve`).

Level-triggered: watchdog events (orch.yaml, spool/incoming, spool/cancel), engine exits,
finished tasks and a periodic resync only *wake* the loop; each pass re-reads what it needs
and acts from scratch. A lost inotify event therefore delays work by at most one resync. (A
task that ended well also hands its slot on at once: `dispatch.Dispatcher._ended`.)

    pass = refresh config → reconcile pools → claim + admit → cancels → dispatch → status

`build` wires a `Daemon` (the CLI, tests and benchmarks call it); `Daemon.run` takes the
folder's lock, adopts engines, recovers tasks, starts the HTTP face (`api_routes`) and loops
until stopped, then drains. Claimed files are taken by `taking`, the pool runtime and the
dispatcher do the rest; the daemon writes status.json after every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugins import registry
from reconciler import (
    about,
    adoption,
    api,
    api_routes,
    cancelling,
    cataloging,
    clocks,
    configuring,
    dispatch,
    fanout,
    logs,
    metrics,
    pools,
    probing,
    rates,
    recovery,
    reloading,
    taking,
    tasking,
    tracing,
    watching,
)
from state import (
    artifacts,
    atomic,
    committer,
    daemon_lock,
    desired,
    errors,
    ids,
    results,
    sessions,
    spool,
    statusfile,
    traces,
)

log = logs.get("daemon")

RESYNC_S = 2.0
SESSION_SWEEP_S = 5.0  # how often session files are swept for expired sessions
# after a failed pass the next waits PASS_RETRY_S, doubled with each failure in a row up to
# PASS_RETRY_MAX_S; a run of failures is said at most every PASS_FAILURE_SAY_S
PASS_RETRY_S = 0.05
PASS_RETRY_MAX_S = 2.0
PASS_FAILURE_SAY_S = 30.0
# While the daemon serves, a thread waiting for the interpreter lock gets it after at most this
# long (Python's default is 5 ms). The commit thread (tasking.Books) does a syscall per file and
# takes the lock back after each: with the loop busy, a file's creation there took 10.6 ms at
# 5 ms and 1.9 ms at 0.5 ms (1.1 ms with the loop idle), and the commits (and the tasks that
# wait on them) slowed by as much.
SWITCH_INTERVAL_S = 0.001


@dataclass(frozen=True)
class Options:
    config_path: Path
    simulate: Path | None = None
    duration_s: float | None = None
    resync_s: float = RESYNC_S
    watch: bool = True  # watchdog on; off proves the resync alone delivers every task
    exit_when_idle: bool = False  # stop once the spool is empty and nothing runs (demos, tests)


def build(
    options: Options,
    *,
    clock: clocks.Clock | None = None,
    plugins: registry.Registry | None = None,
) -> Daemon:
    """A daemon wired for `options`, ready to `run`: the config read and checked (raises
    ConfigProblem with every error), the stores made from its `paths`, the GPU observer
    opened (raises EnvironmentMissing without a driver), the pool runtime and the dispatcher
    sharing one `Rates`. Tests build one and drive `pass_once` on a fake clock."""
    clock = clock or clocks.RealClock()
    plugins = plugins or registry.load()
    config = configuring.AppliedConfig(
        options.config_path.resolve(), set(plugins.engines), clock, keeping=False
    )
    if not config.start() or config.state is None:
        problems = "\n".join(f"  {e}" for e in config.errors)
        raise errors.ConfigProblem(
            f"{config.path} is not a valid config:\n{problems}\n"
            f"run `orchctl validate {config.path}` and fix the lines shown"
        )
    state, base = config.state, config.base
    the_spool = spool.Spool(desired.resolve(base, state.paths.spool)).ensure()
    store = results.ResultStore(desired.resolve(base, state.paths.results))
    state_dir = desired.resolve(base, state.paths.state)
    state_dir.mkdir(parents=True, exist_ok=True)
    wake_event = asyncio.Event()
    shared_rates = rates.Rates()

    def damaged_session(path: Path, why: str) -> None:
        logs.emit(
            log,
            "session.record_lost",
            f"{path} cannot be used ({why}): its session starts again, its turns and tokens "
            "counted from 0 (the file is replaced at its next turn).",
            level=30,
            path=str(path),
        )

    the_sessions = sessions.SessionStore(state_dir / "sessions", damaged=damaged_session)
    hub = fanout.Hub()
    meter = metrics.Metrics(config=config)
    the_artifacts = artifacts.ArtifactStore(desired.resolve(base, state.paths.artifacts))
    tracer = tracing.Tracer(the_artifacts, clock)
    books = tasking.Books(the_spool, store, hub, clock, taps=[meter.tap], finished=tracer.finished)
    runtime = pools.PoolRuntime(
        plugins=plugins,
        observer=plugins.observer(state, base, simulate=options.simulate),
        state_dir=state_dir,
        config=config,
        clock=clock,
        wake=wake_event.set,
        rates=shared_rates,
    )
    runtime.last_snapshot = runtime.observer.observe()
    config.gpu_indices = runtime.gpu_indices
    config.gpus_from_option = options.simulate is not None
    if absent := config.device_errors(state):
        runtime.observer.close()
        listed = "\n".join(f"  {e}" for e in absent)
        raise errors.ConfigProblem(
            f"{config.path} names GPUs this machine does not have:\n{listed}"
        )
    catalog = cataloging.Catalog.open(state_dir, plugins.resolvers, clock)
    runtime.blocked = lambda: catalog.blocked(config.state)
    dispatcher = dispatch.Dispatcher(
        blocked=lambda: catalog.blocked(config.state),
        placed=meter.placed,
        books=books,
        config=config,
        pools=runtime,
        sessions=the_sessions,
        clock=clock,
        wake=wake_event.set,
        rates=shared_rates,
    )
    return Daemon(
        options,
        clock=clock,
        plugins=plugins,
        config=config,
        wake_event=wake_event,
        the_spool=the_spool,
        store=store,
        state_dir=state_dir,
        the_sessions=the_sessions,
        hub=hub,
        books=books,
        runtime=runtime,
        dispatcher=dispatcher,
        meter=meter,
        the_artifacts=the_artifacts,
        tracer=tracer,
        catalog=catalog,
    )


class Daemon:
    """The loop and what it owns; made by `build`."""

    def __init__(
        self,
        options: Options,
        *,
        clock: clocks.Clock,
        plugins: registry.Registry,
        config: configuring.AppliedConfig,
        wake_event: asyncio.Event,
        the_spool: spool.Spool,
        store: results.ResultStore,
        state_dir: Path,
        the_sessions: sessions.SessionStore,
        hub: fanout.Hub,
        books: tasking.Books,
        runtime: pools.PoolRuntime,
        dispatcher: dispatch.Dispatcher,
        meter: metrics.Metrics,
        the_artifacts: artifacts.ArtifactStore,
        tracer: tracing.Tracer,
        catalog: cataloging.Catalog,
    ) -> None:
        self.options = options
        self.clock = clock
        self.plugins = plugins
        self.config = config
        self.wake_event = wake_event
        self.stop_event = asyncio.Event()
        self.hurry_event = asyncio.Event()  # a second stop: do not wait for running tasks
        self.spool = the_spool
        self.results = store
        self.state_dir = state_dir
        self.sessions = the_sessions
        self.hub = hub
        self.books = books
        self.pools = runtime
        self.dispatcher = dispatcher
        self.committer: committer.Committer | None = None  # while it serves
        self.metrics = meter
        meter.watch(self.status)  # gauges are read from the live status at each scrape
        self.artifacts = the_artifacts
        self.tracer = tracer
        self.catalog = catalog
        self.started_at = clocks.rfc3339(clock.now())
        self._next_sweep = 0.0
        self.server: api.Server | None = None
        self._last_status = b""
        self._status_at = 0.0  # time.monotonic() of its last write (or touch)
        self._failed_passes = 0  # passes failed in a row (`_pass_failed`)
        self._status_failing: float | None = None  # when status.json's failure was last said
        self._pass_failure_said = 0.0  # time.monotonic() that was last said
        self._stopping_since: str | None = None  # set as the drain begins (status.json)
        self.taker = taking.Taker(
            # (less a margin: a file's time is the kernel's coarse clock, a few ms behind)
            the_spool,
            store,
            dispatcher,
            config,
            clock,
            self.wake,
            born=time.time() - 0.05,
        )
        books.write_failed = self.taker.write_failed

    def wake(self) -> None:
        self.wake_event.set()

    def stop(self, why: str | None = None) -> None:
        """Stop after draining running tasks (`timeouts.drain_s`); a second call stops at
        once, leaving what still runs resumable."""
        if self.stop_event.is_set():
            if not self.hurry_event.is_set() and self.dispatcher.running:
                running = len(self.dispatcher.running)
                logs.emit(
                    log,
                    "daemon.hurried",
                    f"Stopping now{f' on {why}' if why else ''}: {running} running task(s) are "
                    "left resumable (the next start runs them again).",
                    signal=why,
                    running=running,
                )
            self.hurry_event.set()
        elif why is not None:
            logs.emit(log, "daemon.stopping", f"Stopping on {why}.", signal=why)
        self.dispatcher.stopping = True  # a task that ends now starts no other
        self.stop_event.set()
        self.wake_event.set()

    async def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            spool.quiet_lease_breaks()  # (else task files written in place are not leased)
        try:
            lock = daemon_lock.acquire(
                self.state_dir,
                started_at=self.started_at,
                shared=(self.spool.ensure().root, self.results.root),
            )
        except daemon_lock.Held as held:
            self.pools.observer.close()
            raise errors.ConfigProblem(str(held)) from None
        # this daemon's folder now: a reload the previous one never answered is undone
        # before anything starts on its edit (a reload changes a model line, not paths:)
        undone = reloading.restore_interrupted(self.config.path, self.state_dir)
        if undone is not None:
            logs.emit(log, "config.reload_interrupted", undone + ".", level=30)
            self.config.refresh(settle=False)
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
        # the task commits run in a helper process holding the folder locks too: a restart
        # cannot recover the folder while a commit of this daemon is still renaming files
        helper = self.committer = committer.Committer(keep_fds=[lock.fd, *lock.shared])
        # and the traces are stored by a process of its own, started at the first one; it
        # holds no lock (an artifact is created once, by a link: nothing of it to recover), so
        # a restart never waits for it to die
        writer = self.tracer.writer = traces.TraceWriter()
        try:
            helper.start()
            self.books.committer = helper.commit
            self._say_stranded()  # before its copy is replaced by this one's
            self.config.keep_last_good()  # this daemon serves the folder: its copy now
            return await self._serve()
        finally:
            self.books.committer = None
            helper.close()
            self.tracer.writer = None
            writer.close()
            atomic.release_spares()  # the commits of this process's own threads kept some
            # and what a commit helper killed meanwhile left (its spares, a group it held):
            # named after this process, and no write of it is in flight any more
            for folder in self._written():
                atomic.sweep_leftovers(folder, pid=os.getpid())
            sys.setswitchinterval(switch)
            lock.release()

    def _say_stranded(self) -> None:
        """Warn of task files left in the spool of the config served last, when paths.spool
        has changed since (a restart-only edit): nothing would ever take them."""
        last = self.config.last_good_path
        if not last.is_file() or self.config.from_last_good:
            return
        loaded = desired.load_desired(last, known_engines=self.config.known_engines)
        if loaded.value is None:
            return
        old = spool.Spool(desired.resolve(self.config.base, loaded.value.paths.spool))
        with contextlib.suppress(OSError):
            if old.root.resolve() == self.spool.root.resolve():
                return
        incoming, active = spool.incoming_names(old), spool.active_names(old)
        waiting = len(incoming) + len(active)
        if waiting:
            # each folder's files to the same folder of the new spool: a task that was running
            # (active/) is recovered there as itself, while in incoming/ it would be refused as
            # a new task taking its own id; and only folders that hold files, so the mv works
            moves = [
                f"mv {shlex.quote(str(src))}/* {shlex.quote(str(dst))}/"
                for src, dst, names in (
                    (old.incoming, self.spool.incoming, incoming),
                    (old.active, self.spool.active, active),
                )
                if names
            ]
            logs.emit(
                log,
                "spool.stranded",
                f"{waiting} task file(s) wait in {old.root} (incoming/, active/), the spool of "
                f"the config served last; paths.spool is now {self.spool.root}, so nothing "
                f"will take them. To run them: {' && '.join(moves)}",
                level=30,
                old_spool=str(old.root),
                waiting=waiting,
            )

    def _written(self) -> tuple[Path, ...]:
        """The folders this daemon alone writes files in by temporary name and rename."""
        state = self.state_dir
        return (
            self.results.root,
            state,
            state / "engines",
            self.sessions.root,
            self.spool.failed,
        )

    async def _serve(self) -> int:
        loop = asyncio.get_running_loop()
        drops = [self.spool.incoming, self.spool.cancel]
        watcher = (
            watching.start(
                loop,
                self.wake_event,
                [self.config.path],
                self.config.renamed,
                drops=drops,
                written=(self.spool.incoming, self.taker.written_in_place),
            )
            if self.options.watch
            else None
        )
        deadline = (
            self.clock.monotonic() + self.options.duration_s
            if self.options.duration_s is not None
            else None
        )
        # token streams reuse their connection to a replica while this daemon serves
        engines: list[Any] = [
            e for e in self.plugins.engines.values() if hasattr(e, "keep_connections")
        ]
        for engine in engines:
            engine.keep_connections()
        try:
            await adoption.adopt_or_clean(self.pools)
            recovery.sweep(*self._written())
            # paths.artifacts may be another config's too: only what dead writers left
            recovery.sweep(self.tracer.store.root, shared=True)
            spool.sweep_tmp(self.spool, now=self.clock.now())
            self.results.index()  # a new task's id is then checked without a lookup
            self.spool.index_filed()  # and where its file is filed, too
            self._recover()
            self.server = await api_routes.start(self)
            logs.emit(  # only now: a daemon that cannot listen never served
                log,
                "daemon.started",
                f"Serving {self.config.path.name} (pid {os.getpid()}); spool at {self.spool.root}.",
                pid=os.getpid(),
                simulated=self.pools.observer.simulated,
            )
            while not self.stop_event.is_set():
                try:
                    await self.pass_once(settle=False)
                except atomic.GroupFailed as exc:  # some tasks' writes: the others' are done
                    for key, error in exc.failures.items():
                        if key not in exc.repeated:
                            tasking.write_deferred(key, error)
                except OSError as exc:  # a full disk: the next pass retries what failed
                    await self._pass_failed(exc)
                    continue
                self._failed_passes = 0
                if self.options.exit_when_idle and self._idle():
                    logs.emit(log, "daemon.idle", "Spool empty and nothing running: stopping.")
                    break
                timeout = self.options.resync_s
                if self.config.state is not None:  # the NVML poll: GPUs change on their own
                    timeout = min(timeout, self.config.state.gpus.poll_s)
                if (settle := self.config.wake_in_s()) is not None:  # an edit settling
                    timeout = min(timeout, settle + 0.01)
                if (written := self.taker.wake_in_s()) is not None:  # a task file too
                    timeout = min(timeout, written)
                # a pass at least this often: status.json's time says the daemon is not hung
                timeout = min(timeout, probing.STATUS_TOUCH_S)
                if (due := self.dispatcher.queue.next_deadline()) is not None:
                    # a queued task's deadline fails it when it passes, not a poll later
                    timeout = min(timeout, max(0.0, due - self.clock.monotonic()) + 0.005)
                if deadline is not None:
                    timeout = min(timeout, deadline - self.clock.monotonic())
                    if timeout <= 0:
                        break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake_event.wait(), timeout)
                self.wake_event.clear()
        finally:
            self.dispatcher.stopping = True  # also at the end of --duration: drain, start nothing
            if watcher is not None:
                watcher.stop()
                await asyncio.to_thread(watcher.join, 5)
            drain_s = self.config.state.timeouts.drain_s if self.config.state else 0.0
            if self.dispatcher.running and not self.hurry_event.is_set():
                logs.emit(
                    log,
                    "daemon.draining",
                    f"Stopping: waiting up to {drain_s:.0f} s for {len(self.dispatcher.running)} "
                    "running task(s) to finish (signal again to stop now).",
                    running=len(self.dispatcher.running),
                )
            self._stopping_since = clocks.rfc3339(self.clock.now())
            self._write_status()  # says it stops: `orchctl submit --wait` need not wait
            await self.dispatcher.shutdown(
                drain_s=drain_s, hurry=self.hurry_event, tick=self._while_draining
            )
            self.books.flush()  # the last finished tasks' files, before anything stops
            await self.tracer.flush()
            if self.server is not None:
                await self.server.stop()
                # the requests the closing API answered DAEMON_STOPPING asked to cancel their
                # tasks: a queued one is canceled now, as the answer said, not at the next start
                self._apply_cancels()
                self.books.flush()
            await self.pools.shutdown()
            for engine in engines:
                with contextlib.suppress(Exception):
                    await engine.close()
            self._write_status(stopping=True)
            left = len(spool.active_names(self.spool)) + len(spool.incoming_names(self.spool))
            logs.emit(
                log,
                "daemon.stopped",
                "Stopped; engines stopped, "
                + (
                    f"{left} task file(s) left to run at the next start."
                    if left
                    else "no task left waiting."
                ),
                tasks_left=left,
            )
        return 0

    async def _pass_failed(self, exc: OSError) -> None:
        """A pass failed (a full disk, no descriptors left): said, then the next one waits,
        longer each time up to PASS_RETRY_MAX_S (the watcher's wake-ups do not shorten it),
        so a failure that lasts neither spins the loop nor floods the log."""
        self._failed_passes += 1
        n, now = self._failed_passes, time.monotonic()
        if n == 1 or now - self._pass_failure_said >= PASS_FAILURE_SAY_S:
            self._pass_failure_said = now
            again = f" ({n} passes in a row)" if n > 1 else ""
            logs.emit(
                log,
                "pass.failed",
                f"A pass failed{again}: {exc}. Retrying; what it did not finish is taken up again.",
                level=40,
                failed_passes=n,
            )
        wait_s = min(PASS_RETRY_MAX_S, PASS_RETRY_S * 2 ** (n - 1))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), wait_s)

    async def pass_once(self, *, settle: bool = True) -> None:
        """One level-triggered pass over everything; with `settle`, its task files are on
        disk when it returns. The serving loop does not wait for that: the commit of a pass's
        writes would hold up the next pass (the rest of a burst of task files, cancels) by as
        long as the disk takes for every task write pending meanwhile, each task's own steps
        wait for its own writes (`Books.settled`), and the status file reads what is pending."""
        if self.config.refresh():
            self.dispatcher.sync_queue_config()
        await self.pools.reconcile()
        # one group commit for the pass's task writes: a burst's claims, queued results,
        # refusals, consumed cancels and failures cost a few syncs together, not several
        # fsyncs each (state/atomic.py, docs/files.md); their order is kept
        with atomic.group():
            self.taker.claim_batch()
            # after intake, before dispatch: a task cancelled while still in incoming/ is
            # queued here and removed before it can start
            self._apply_cancels()
            if self.clock.monotonic() >= self._next_sweep:  # reads every session: not per pass
                self._next_sweep = self.clock.monotonic() + SESSION_SWEEP_S
                self.dispatcher.sweep_sessions()
                # task files a failed write (a full disk) left in active/ with no live run
                self._recover(owned={run.file_name for run in self.dispatcher.runs.values()})
            self.dispatcher.pump()
        if settle:
            await self.books.settled()
        self._write_status()

    def _while_draining(self) -> None:
        """Every tick of the drain: the cancel requests, and status.json kept fresh (the
        drain may take longer than a reader waits for a daemon that stopped responding)."""
        with atomic.group():
            self.taker.claim_canceled()  # a canceled task still in incoming/ is taken to end
        self._apply_cancels()
        self._write_status()

    def _apply_cancels(self) -> None:
        """The cancel requests alone (while running tasks drain: nothing else is taken)."""
        with atomic.group():
            cancelling.apply(
                the_spool=self.spool,
                store=self.results,
                dispatcher=self.dispatcher,
                clock=self.clock,
            )

    def _recover(self, *, owned: frozenset[str] | set[str] = frozenset()) -> None:
        """Take the task files in active/ that no run owns: at startup those a crash left,
        later those a failed write (a full disk) left half-done, which are so retried."""
        recovery.recover(
            the_spool=self.spool,
            store=self.results,
            take=lambda path, existing: self.taker.take(path, recovered=existing),
            refuse_duplicate=self.taker.refuse_duplicate,
            revision=self.config.revision,
            owned=owned,
        )
        self.taker.announce()

    def _idle(self) -> bool:
        return (
            not spool.incoming_names(self.spool)
            and not self.dispatcher.runs
            and self.pools.settled()
        )

    def cancel(self, task_id: ids.TaskId) -> str:
        """Cancel a live task by id at once (idempotent); what happened, for a caller that
        already made the request durable. Returns canceled, already <status> or unknown."""
        if self.dispatcher.cancel(task_id):
            return "canceled"
        existing = self.results.read(task_id) if self.results.exists(task_id) else None
        return f"already {existing.status}" if existing and existing.terminal else "unknown"

    def status(self, *, stopping: bool = False) -> statusfile.StatusFile:
        """What status.json says now, assembled from the rows the pools and the dispatcher
        return."""
        config, snapshot = self.config, self.pools.last_snapshot
        return statusfile.StatusFile(
            daemon=statusfile.DaemonRow(
                pid=os.getpid(),
                started_at=self.started_at,
                version=about.version(),
                simulated=self.pools.observer.simulated,
                state="stopped" if stopping else "running",
                url=self.server.url if self.server is not None and not stopping else None,
                paths={
                    "spool": str(self.spool.root.resolve()),
                    "results": str(self.results.root.resolve()),
                    "state": str(self.state_dir.resolve()),
                },
                stopped_at=clocks.rfc3339(self.clock.now()) if stopping else None,
                stopping_since=self._stopping_since if not stopping else None,
            ),
            config=statusfile.config_row(
                str(config.path), config.revision, config.applied_at, config.errors
            ),
            gpus=[statusfile.gpu_row(g) for g in (snapshot.gpus if snapshot else ())],
            pools=self.pools.status_rows(stopping=stopping),
            queue=self.dispatcher.queue_row(),
        )

    def _write_status(self, *, stopping: bool = False) -> None:
        try:
            raw = self.status(stopping=stopping).model_dump_json(indent=2).encode() + b"\n"
            path = self.state_dir / "status.json"
            now = time.monotonic()
            if raw == self._last_status:  # most passes change nothing a reader would see
                if now - self._status_at < probing.STATUS_TOUCH_S:
                    return
                self._status_at = now
                with contextlib.suppress(FileNotFoundError):  # removed by hand: written
                    os.utime(path)  # but its time says the daemon still passes
                    if os.stat(path).st_size == len(raw):
                        return
                # removed, cut or changed by hand: written whole again now
            atomic.write_bytes(path, raw, durable=False, kind="status")
            self._last_status, self._status_at = raw, now
        except OSError as exc:  # said once, then at most every PASS_FAILURE_SAY_S while it lasts
            now = time.monotonic()
            if self._status_failing is None or now - self._status_failing >= PASS_FAILURE_SAY_S:
                self._status_failing = now
                logs.emit(log, "status.unwritable", f"Could not write status.json: {exc}", level=40)
            return
        self._status_failing = None
